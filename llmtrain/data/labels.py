"""The label convention shared by the data (which writes labels) and the losses (which read them)."""

IGNORE_INDEX = -100  # label of a position that carries no loss: padding, prompts, sample starts (as HF, F.cross_entropy)
