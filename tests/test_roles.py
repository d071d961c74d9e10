"""Roles of examples (DESIGN.md): twins, matched ID populations, custom kind; and the legacy values reproduce the
data of before these parameters existed, bit for bit (values recorded from the code before the change)."""
import hashlib
import random

import numpy as np
import pytest

from forgetlab import data as sources
from forgetlab import forget_sets as fs
from forgetlab import llm_data, llm_finetune
from forgetlab.config import load_params
from forgetlab.tokenizer import decode

EXAMPLE_COLUMNS = ["uid", "kind", "role", "source", "text", "ids", "n_tokens", "score_start", "n_scored", "secret"]
# (fingerprint, examples table, train + held-out rows) recorded before the change
LEGACY_SMALL = ("1cd6a09ef2b3eb41", "3f8cbac4e7491ce4", "a30687ab313ad096")      # conftest's small_params
LEGACY_SMOKE = ("53ed024f0ec0ba2d", "918fc9ea80dd1e0b", "0148facaa79688e4")      # papermill_params/smoke.yaml
LEGACY_DEFAULT = ("6e0093a1f879cfec", "b0c9f2d3e5617b41", "e729419953bad5d9")    # papermill_params/default.yaml
# LLM data on test_llm's character tokenizer: (fingerprint, examples, rows, fine-tuning rows and orders)
LEGACY_LLM = ("086f683e3bd06aa6", "859daa3e7a020384", "299296c3ed06d5d1", "6fb1439efc7b7497")


def digest(data) -> tuple[str, str, str]:
    table = data.examples[EXAMPLE_COLUMNS].to_json(orient="records").encode()
    rows = np.ascontiguousarray(data.train_rows).tobytes() + np.ascontiguousarray(data.heldout_rows).tobytes()
    return data.fingerprint(), hashlib.sha256(table).hexdigest()[:16], hashlib.sha256(rows).hexdigest()[:16]


def test_shipped_profiles_use_the_new_design_and_keep_the_legacy_sources():
    design = {"reference_data": "twins", "id_population": "train-plays"}
    for profile in ("smoke", "classroom", "default", "full"):
        p = load_params(profile)
        assert {k: p[k] for k in fs.LEGACY} == {**fs.LEGACY, **design}


def test_legacy_values_reproduce_the_small_data(small_params):
    assert digest(fs.build_study_data({**small_params, **fs.LEGACY})) == LEGACY_SMALL


@pytest.mark.slow
@pytest.mark.parametrize("profile, expected", [("smoke", LEGACY_SMOKE), ("default", LEGACY_DEFAULT)])
def test_legacy_values_reproduce_the_profiles_data(profile, expected):
    assert digest(fs.build_study_data(load_params(profile, fs.LEGACY))) == expected


# --------------------------------------------------------------------------------------- the new design, tiny model

def _diary(path, n=40, seed=0):
    rng = random.Random(seed)
    words = "my garden grows tall tomatoes while the neighbours paint their fence a brave shade of blue".split()
    path.write_text("\n".join(f"Entry {i}: " + " ".join(rng.choice(words) for _ in range(18)) for i in range(n))
                    + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def new(small_params, tmp_path_factory):
    path = _diary(tmp_path_factory.mktemp("custom") / "diary.txt")
    p = load_params("smoke", {**{k: small_params[k] for k in ("max_train_tokens", "vocab_size", "population_size",
                                                              "background_size", "forget_size", "control_size")},
                              "forget_kinds": ["id", "canary", "language", "code", "custom"], "language": "japanese",
                              "canary_template": "Dear diary, the code is {secret}", "custom_source": str(path),
                              "reference_data": "twins", "id_population": "train-plays"})
    return {"p": p, "data": fs.build_study_data(p), "path": path}


def test_twins_match_their_forget_sets(new):
    p, ex = new["p"], new["data"].examples
    for kind in p["forget_kinds"]:
        forget, twin = ex[(ex.kind == kind) & (ex.role == "forget")], ex[(ex.kind == kind) & (ex.role == "twin")]
        assert len(twin) == len(forget) == p["forget_size"]
        assert twin.source.tolist() == forget.source.tolist()
        assert twin.n_tokens.tolist() == forget.n_tokens.tolist() and twin.n_scored.tolist() == forget.n_scored.tolist()
    assert len({tuple(i) for i in ex.ids}) == len(ex)                   # every role disjoint from every other
    can = ex[ex.kind == "canary"]
    assert can.secret.is_unique and (can[can.role == "twin"].n_scored == p["canary_digits"]).all()


def test_reference_rows_hold_twins_exactly_where_the_original_holds_forget_rows(new):
    data, p = new["data"], new["p"]
    ids_o, labels_o, uid_o = fs.training_rows(data, "original")
    ids_r, labels_r, uid_r = fs.training_rows(data, "reference")
    assert ids_o.shape == ids_r.shape and (labels_o != -100).sum() == (labels_r != -100).sum()   # same steps, tokens
    n = len(data.train_rows)
    assert (ids_o[:n] == ids_r[:n]).all()
    kind_role = {u: u.split("-")[:2] for u in data.examples.uid}
    for a, b in zip(uid_o[n:], uid_r[n:]):
        (ka, ra), (kb, rb) = kind_role[a], kind_role[b]
        assert ka == kb and (ra, rb) in {("forget", "twin"), ("background", "background")}
        assert a.rsplit("-", 1)[1] == b.rsplit("-", 1)[1]               # forget i <-> twin i
    counts_o, counts_r = fs.insertion_counts(uid_o), fs.insertion_counts(uid_r)
    forget = data.examples[data.examples.role == "forget"].uid
    twins = data.examples[data.examples.role == "twin"].uid
    assert (counts_o[forget] == p["insertions"]).all() and (counts_r[twins] == p["insertions"]).all()
    assert not set(twins) & set(counts_o.index) and not set(forget) & set(counts_r.index)
    table = fs.summary_table(data).set_index(["kind", "role"])
    assert table.loc[("custom", "twin"), "in_reference"] == p["insertions"]
    assert table.loc[("custom", "twin"), "in_original"] == 0


def _contains(rows: np.ndarray, window: list[int]) -> bool:
    stream = "".join(map(chr, rows.reshape(-1).tolist()))
    return "".join(map(chr, window)) in stream


def test_matched_id_population_is_cut_from_the_training_plays_and_never_trained(new):
    data, p = new["data"], new["p"]
    plays = sources.load_shakespeare(p["heldout_plays"], p["seed"])
    train_text, held_text = "".join(plays["train"]["text"]), "".join(plays["heldout"]["text"])
    held_back = data.examples[(data.examples.kind == "id") & data.examples.role.isin(["population", "control", "twin"])]
    assert (held_back.source == "shakespeare/train").all() and len(held_back) == p["population_size"] + \
        p["control_size"] + p["forget_size"]
    for r in held_back.itertuples():
        assert r.text in train_text and r.text not in held_text           # from the training plays only
        assert not _contains(data.train_rows, list(r.ids[1:]))           # cut out of the shared stream
    never = data.examples[data.examples.role.isin(["population", "control"])]
    for role in fs.MODEL_ROLES:
        rows = {tuple(r) for r in fs.training_rows(data, role)[0].tolist()}
        for r in never.itertuples():
            assert tuple(list(r.ids) + [data.bos] * (data.block_size - len(r.ids))) not in rows


def test_custom_kind_from_a_user_file(new):
    data, p = new["data"], new["p"]
    custom = data.select("custom")
    lines = new["path"].read_text(encoding="utf-8").splitlines()
    assert (custom.n_tokens == p["example_tokens"]).all()
    assert all(any(line.startswith(t) for line in lines) for t in custom.text)   # each one record's first tokens
    assert custom.groupby("role").size().to_dict() == {"forget": 3, "twin": 3, "background": 4, "population": 8,
                                                       "control": 2}
    assert fs.kind_labels(p)["custom"] == "custom: diary" and fs.kind_labels(p)["language"] == "OOD: Japanese"
    assert set(data.select("language").source) == {"chatterbot/japanese"}


def test_canary_template_is_what_the_canaries_say(new):
    data = new["data"]
    for r in data.select("canary").itertuples():
        assert decode(data.tokenizer, r.ids) == f"Dear diary, the code is {r.secret}"
        assert decode(data.tokenizer, r.ids[r.score_start:]) == r.secret
    assert data.canary_prefix_ids() == fs.canary_prefix_ids(data.tokenizer, "Dear diary, the code is {secret}")


# --------------------------------------------------------------------------------------- the LLM study

@pytest.fixture(scope="module")
def llm_setup():
    from test_llm import CharTok, _texts

    english, persian = _texts()
    tok = CharTok(english + persian)
    p = load_params("smoke", {"llm_example_tokens": 12, "llm_train_layers": 1, "llm_unlearn_steps": 3,
                              "llm_record_every": 2, "llm_methods": ["ga", "npo"], "llm_canary_digits": 2,
                              "llm_unlearn_lr": 0.001, "llm_lr": 0.003, "llm_finetune_epochs": 2.0, **fs.LEGACY})
    return p, tok, english, persian


def test_legacy_values_reproduce_the_llm_data(llm_setup):
    p, tok, english, persian = llm_setup
    data = llm_data.build_llm_data(p, tok, english=english, lowresource=persian)
    table = hashlib.sha256(data.examples[EXAMPLE_COLUMNS].to_json(orient="records").encode()).hexdigest()[:16]
    rows = hashlib.sha256(data.retain_rows.tobytes() + data.heldout_rows.tobytes()).hexdigest()[:16]
    seqs, is_forget, uids = llm_finetune.finetune_rows(data)
    orders = (llm_finetune.finetune_order(is_forget, 2.0, 0, True), llm_finetune.finetune_order(is_forget, 2.0, 1, False))
    rows_digest = hashlib.sha256(repr((seqs, is_forget.tolist(), uids, orders[0].tolist(), orders[1].tolist()))
                                 .encode()).hexdigest()[:16]
    assert (data.fingerprint(), table, rows, rows_digest) == LEGACY_LLM
    ref_seqs, ref_forget, ref_uids = llm_finetune.finetune_rows(data, "reference")     # plain: the original's rows,
    assert ref_seqs == seqs and ref_uids == uids and (ref_forget == is_forget).all()    # the forget slots dropped
    assert not llm_finetune.keeps_forget_slots(data, "reference")


@pytest.mark.parametrize("id_population", ["heldout-plays", "train-plays"])
def test_llm_twins_and_matched_population(llm_setup, id_population):
    p, tok, english, persian = llm_setup
    plain = llm_data.build_llm_data(dict(p, id_population=id_population), tok, english=english, lowresource=persian)
    data = llm_data.build_llm_data(dict(p, reference_data="twins", id_population=id_population), tok,
                                   english=english, lowresource=persian)
    ex = data.examples
    # Twins change nothing but adding the twins.
    assert plain.examples.equals(ex[ex.role != "twin"].reset_index(drop=True))
    assert len({tuple(i) for i in ex.ids}) == len(ex) and data.fingerprint() != plain.fingerprint()
    for kind in llm_data.KINDS:
        twin, forget = data.select(kind, "twin"), data.select(kind, "forget")
        assert len(twin) == len(forget) and twin.n_scored.tolist() == forget.n_scored.tolist()
    so, fo, uo = llm_finetune.finetune_rows(data, "original")
    sr, fr, ur = llm_finetune.finetune_rows(data, "reference")
    assert len(so) == len(sr) and (fo == fr).all() and llm_finetune.keeps_forget_slots(data, "reference")
    role = dict(zip(ex.uid, ex.role))
    assert [role.get(u) for u, f in zip(uo, fo) if f] == ["forget"] * int(fo.sum())
    assert [role.get(u) for u, f in zip(ur, fr) if f] == ["twin"] * int(fr.sum())
    trained = {tuple(r) for r in data.retain_rows} | {tuple(s) for s in so + sr}
    never = ex[ex.role.isin(["population", "control"])]
    assert not any(tuple(i) in trained for i in never.ids)
    id_never = never[never.kind == "id"]
    assert set(id_never.source) == {"english/train" if id_population == "train-plays" else "english/heldout"}
    assert not {tuple(r) for r in data.heldout_rows} & ({tuple(i) for i in ex.ids} | trained)
    table = llm_data.summary_table(data).set_index(["kind", "role"])
    assert table.loc[("language", "twin"), "in_reference"] == p["llm_insertions"]
    assert llm_data.llm_kind_labels(dict(p, llm_language="japanese"))["language"] == "OOD: Japanese"
