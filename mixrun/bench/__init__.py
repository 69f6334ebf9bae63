"""``mixrun bench``: run each planned candidate that fits, measure prefill and decode speed, compare with the
prediction, and say which candidate won.

Method, per candidate: load it, warm up once (same prompt length, a few tokens), then ``repeats`` times feed a
prompt of exactly ``prompt_tokens`` tokens and decode ``tokens`` tokens greedily (temperature 0, no repeat
penalty). Both engines keep the KV cache of the previous turn and prefill only past the common prefix, so every
prompt starts with a different word (a nonce) and the tokens actually prefilled are counted from the prefix the
previous prompt shares (0, or 1 for a BOS token). Prefill tok/s = tokens prefilled / time to the first token;
decode tok/s = (tokens decoded - 1) / time from the first token to the last. The prompt is the start of a story,
which the model continues; it may still stop early at an end-of-generation token (the engines have no
ignore-EOS switch), and then the achieved count is reported.

The figures are medians over the repeats, with the spread (min-max). Ctrl-C keeps what was measured so far.
The values are in :mod:`.results`, measuring in :mod:`.measure`, recording into a profile in
:mod:`.record`, the tables in :mod:`.render`, the command in :mod:`.command`.
"""
