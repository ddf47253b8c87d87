"""Input pipelines: `tokenizer` (byte / BPE), `corpus` (the bundled English text), `builders` (TFDS builders and
the one way data sets are opened), `lm` (the grain LM pipeline and corpus statistics)."""
