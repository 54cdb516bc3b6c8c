"""Ray Data stage graphs. Read in order: read -> tokenize -> embed -> build (spill,
compressor, index, publish). Stage classes are thin wrappers over `dresd` functions."""
