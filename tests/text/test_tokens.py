"""curate.text.tokens: the body cut equals decode(encode(text)[:n]) for SentencePiece; errors."""

import pytest

from curate.text.tokens import TokenizerError, WhitespaceTokenizer, load_tokenizer


def _prose():
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)[:60]]


def test_sentencepiece_prefix_cut_equals_full_encode(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    texts = _prose()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([l for t in texts for l in t.splitlines() if l.strip()]),
                                   model_prefix=str(tmp_path / "bpe"), vocab_size=800, model_type="bpe",
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   byte_fallback=True, num_threads=1, minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "bpe.model"))
    sp = tok.sp
    for text in texts[:30]:
        ids = sp.encode(text)
        for n in (1, 17, 300, len(ids) - 1, len(ids), len(ids) + 5):
            if n < 1:
                continue
            want = sp.decode(ids[:n]) if len(ids) > n else text
            assert tok.truncate(text, n) == want, (n, text[:80])
        assert tok.count([text]) == [len(ids)]


def test_whitespace_cut_keeps_the_text_of_the_first_words():
    tok = WhitespaceTokenizer()
    text = "  one two\n\nthree\tfour  five "
    assert tok.truncate(text, 3) == "  one two\n\nthree"
    assert tok.truncate(text, 5) == text and tok.truncate(text, 9) == text
    assert tok.count([text, "", None]) == [5, 0, 0]


def test_unknown_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="not a local file"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path / "empty"))
