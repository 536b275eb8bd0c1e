"""Speculative decoding: proposers guess the next k tokens, one forward scores them, rejection sampling
keeps a prefix (exact under greedy and sampling). See docs/speculative-decoding.md."""
