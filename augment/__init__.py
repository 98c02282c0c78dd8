"""The corpus builder: prompts, answer parsing and validation, synthesis of labelled sentences, and the CLI."""
