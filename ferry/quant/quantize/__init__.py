"""``ferry quantize``: RTN, GPTQ and AWQ of a float checkpoint into GPTQ, AWQ or
compressed-tensors layouts (``rtn.py`` codes, ``formats.py`` writers)."""
