"""OutputProcessor, built directly: stop tokens and strings, length, logprobs, deltas with hold-back."""
from __future__ import annotations

from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.output_processor import OutputProcessor
from tests.engine_units import CharTokenizer, make_request

EOS = 1


def setup(prompt: str = "ab", max_tokens: int = 16, max_model_len: int = 64, **params):
    tok = CharTokenizer()
    bm = BlockManager(16, 4)
    proc = OutputProcessor(tok, {EOS}, max_model_len, bm, structured=None)
    req = make_request("r", tok.encode(prompt), max_tokens, **params)
    seq = req.seqs[0]
    seq.detokenizer = IncrementalDetokenizer(tok, seq.token_ids)
    assert bm.allocate(seq, seq.num_tokens)
    return proc, req, seq, bm


def feed(proc, req, seq, text: str) -> None:
    for c in text:
        if seq.finished:
            break
        proc.append_token(req, seq, ord(c), None, None, now=0.0)


def test_eos_finishes_with_stop_and_frees_blocks():
    proc, req, seq, bm = setup()
    feed(proc, req, seq, "xy")
    proc.append_token(req, seq, EOS, None, None, now=0.0)
    assert (seq.finish_reason, seq.stop_reason) == ("stop", None)
    assert seq.output_text == "xy" and seq.block_table == [] and bm.num_free_blocks == 16


def test_ignore_eos_keeps_going_to_the_length_limit():
    proc, req, seq, _ = setup(max_tokens=3, ignore_eos=True)
    for _ in range(3):
        proc.append_token(req, seq, EOS, None, None, now=0.0)
    assert seq.finish_reason == "length" and seq.num_output_tokens == 3


def test_stop_token_id_is_reported_as_the_stop_reason():
    proc, req, seq, _ = setup(stop_token_ids=[ord("!")])
    feed(proc, req, seq, "hi!more")
    assert (seq.finish_reason, seq.stop_reason, seq.output_text) == ("stop", ord("!"), "hi")


def test_stop_string_across_tokens_is_cut_from_the_text():
    proc, req, seq, _ = setup(stop=["END"])
    feed(proc, req, seq, "abcENDxyz")
    assert (seq.finish_reason, seq.stop_reason, seq.output_text) == ("stop", "END", "abc")


def test_stop_string_kept_when_asked_and_earliest_wins():
    proc, req, seq, _ = setup(stop=["cd", "bcd"], include_stop_str_in_output=True)
    feed(proc, req, seq, "abcdef")
    assert (seq.stop_reason, seq.output_text) == ("bcd", "abcd")


def test_stop_strings_wait_for_min_tokens():
    proc, req, seq, _ = setup(stop=["x"], min_tokens=3)
    feed(proc, req, seq, "xaxb")
    assert seq.output_text == "xa" and seq.stop_reason == "x"  # the first "x" came too early to count


def test_max_model_len_ends_a_sequence():
    proc, req, seq, _ = setup(prompt="abcd", max_model_len=6, max_tokens=100)
    feed(proc, req, seq, "xyz")
    assert seq.finish_reason == "length" and seq.num_tokens == 6


def test_deltas_hold_back_text_that_may_start_a_stop_string():
    proc, req, seq, _ = setup(stop=["STOP"])
    feed(proc, req, seq, "helloST")
    out = proc.make_output(req)
    assert out.outputs[0].text == "hell"  # 3 characters held back: "oST" may begin "STOP"
    assert out.deltas == [("hell", [ord(c) for c in "helloST"])]
    feed(proc, req, seq, "OP")
    out = proc.make_output(req)
    assert out.finished is False and out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].text == "hello" and out.deltas == [("o", [ord("O"), ord("P")])]


def test_logprobs_keep_the_top_k_and_the_sampled_token():
    proc, req, seq, _ = setup(logprobs=1)
    seq.logprobs = []
    proc.append_token(req, seq, ord("z"), ([ord("a"), ord("b")], [-0.1, -2.0], 5), -3.0, now=0.0)
    (entry,) = seq.logprobs
    assert list(entry) == [ord("a"), ord("z")]
    assert entry[ord("z")].rank == 5 and entry[ord("z")].decoded_token == "z"
    assert seq.cumulative_logprob == -3.0
