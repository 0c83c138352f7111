"""Stand-in for liger-kernel (tests only): see tests/stand_ins/README.md."""
