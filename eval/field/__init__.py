"""The field benchmark: the monitor as users meet it (docs/benchmark/field.md).

Six training jobs written as a user writes them (`jobs`: their own modules, a torchvision model, a
tiny Hugging Face BERT; plain loops, gradient accumulation, bf16 autocast, Lightning, the Hugging Face
Trainer; Adam, AdamW, SGD with momentum, RMSprop; images, tabular data, text), each run healthy and
with one fault of each kind injected in the user's own code (`faults`), all monitored by
`diagnose.watch(model, optimizer)` with its defaults or the project's framework adapters with none.
`run` runs them and writes results.json; `score` turns the records into detection, right-kind, delay
and false-alarm tables. Nothing here imports the project's `factory`.

    python -m eval.field --out outputs/field            # full: 6 jobs x 7 conditions x 2 seeds x 1,500 steps
    python -m eval.field --out outputs/field_quick --quick
"""
