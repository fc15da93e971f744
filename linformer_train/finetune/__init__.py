"""Downstream fine-tuning: sequence and sentence-pair classification on the pretraining engine.

- ``config``   typed YAML schema (model, task, optim, train, precision, zero, logging) and validate()
- ``tasks``    presets (sst2, imdb, qnli, qqp via ``datasets``) and local CSV / TSV / JSONL files
- ``data``     tokenization, truncation to the model's n, padding with an attention mask, rank sharding
- ``metrics``  accuracy, F1, MCC
- ``loop``     DeepSpeed fine-tuning per seed, evaluation each epoch, best model kept, results.json
- ``predict``  one label per input line with a fine-tuned model directory (no DeepSpeed)
"""
