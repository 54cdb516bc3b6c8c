"""Ray Data stage graphs over the dresd library. Build: a count pass (read -> tokenize), a
fit pass (read -> tokenize -> embed a sample; the compressor fitted), one streaming pass
(read -> tokenize -> embed -> compress -> write), the index trained on stored keys, a code
pass (keys -> IVF codes), then merge, check, publish; update adds to a published store the
same way with its parent's frozen codec; decode runs batch offline decoding. Stage classes
are thin wrappers over `dresd` functions."""
