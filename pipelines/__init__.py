"""Ray Data stage graphs over the dresd library. Build, in order: read -> tokenize -> embed
-> build (spill, compressor, index, publish); update adds to a published store; decode runs
batch offline decoding. Stage classes are thin wrappers over `dresd` functions."""
