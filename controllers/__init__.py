"""Decoding controllers: who decides which masked tokens to commit at each step."""
