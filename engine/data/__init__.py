"""Load, detect, normalise and tokenise datasets.

Pipeline: `sources` (a dataset or a weighted mixture, read by config and split: a local file -> plain
dicts via `load.load_rows`; a hub id, a Hub-layout or saved directory -> an Arrow-backed
`datasets.Dataset`; columns kept and renamed by a column map) ->
`formats.detect_format` (from the column names and the first row's value types) ->
`normalise.normalise` each row to a prompt and its completion(s) -> `tokenise`: render
conversational rows with the tokenizer's chat template, tokenise prompts and completions
separately, in batches, truncate / drop (run by `datasets`' batched map, in several processes for
large files) -> `prepare.prepare` ties them together, splits train/eval and keeps the result in the
tokenised-data cache (`cache`). Examples come back as `examples.Examples`: flat columns whose dicts
are built when read.

Examples are plain dicts (see `prepare`); every completion ends with the tokenizer's EOS unless it
was truncated. `engine.batching` turns them into padded tensors.

Errors a user can cause are `DataError`s (bad parameter values: `SpecError`) with one-line messages;
row numbers in them count from 0, like `dataset[i]`; file line numbers count from 1, like an editor.

Nothing here imports torch or transformers: front ends call `checks.check_run_data` at submit time.
"""

from engine.data.formats import FORMAT_COLUMNS, FORMATS, KIND_OF_FORMAT, PRESETS_FOR_KIND, detect_format
from engine.data.load import DATA_FILE_SUFFIXES, load_rows
from engine.data.prepare import STAT_KEYS, PreparedData, check_dataset, prepare

__all__ = [
    "DATA_FILE_SUFFIXES",
    "FORMATS",
    "FORMAT_COLUMNS",
    "KIND_OF_FORMAT",
    "PRESETS_FOR_KIND",
    "STAT_KEYS",
    "PreparedData",
    "check_dataset",
    "detect_format",
    "load_rows",
    "prepare",
]
