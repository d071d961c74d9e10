"""read_tidy_csv: the cache's tidy tables read back exactly as written."""
import pandas as pd

from forgetlab.tables import read_tidy_csv


def test_read_tidy_csv_keeps_uids_as_text_and_model_rows_empty():
    table = pd.DataFrame({"step": [0, 0, 1], "uid": ["007", "", "NA"], "metric": ["ll", "heldout_ppl", "ll"],
                          "value": [-1.5, 12.0, float("nan")]})
    back = read_tidy_csv(table.to_csv(index=False))
    assert back.uid.tolist() == ["007", "", "NA"]                  # zeros kept, '' for the model-level row
    assert back.step.dtype.kind == "i" and back.value.iloc[0] == -1.5 and pd.isna(back.value.iloc[2])
    assert back.equals(table)


def test_read_tidy_csv_without_uid_column():
    back = read_tidy_csv("kind,value\nid,1.0\nNA,\n")
    assert back.kind.tolist() == ["id", "NA"] and pd.isna(back.value.iloc[1])
