"""`python -m llmtrain <command> ...` = the `llmtrain` entry point (llmtrain/cli)."""
import sys

from llmtrain.cli import main

sys.exit(main())
