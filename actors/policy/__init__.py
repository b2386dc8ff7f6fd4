"""A small built-in decision maker: a kext client that answers verdicts from a rules file."""
