"""Corpus -> cleaned, tokenized LITPKDS chunks, as stages of datatrove pipelines (local processes or Slurm arrays).

Stages, each a set of independent tasks, and the stage order:
  hash      (cleaning on) per shard: the keys of its paragraphs with their corpus positions, bucketed by key
  repeats   (cleaning on) per key bucket: every occurrence of a key but the first in corpus order
  tokenize  per shard: drop repeated paragraphs, short and out-of-ratio documents; tokenize; split by id hash
  pack      per range of chunks: cut the concatenated shards into LITPKDS chunks with their document indexes
  finalize  one task: manifests, the cleaning report, and one atomic switch to the new dataset
Every stage's output is a function of the corpus order alone (shards are contiguous pieces of the inputs, in
order), so any number of tasks or workers gives the same bytes. Work lives in OUTPUT/.staging until the switch.
`prepare.prepare` runs one preparation; `scripts/prepare_data.py` is its command line.

What datatrove does (executor.py): each stage is a datatrove PipelineStep run by a LocalPipelineExecutor or, on a
cluster, a SlurmPipelineExecutor; stages depend on each other with `depends=` (datatrove runs the dependency first
locally and submits the array jobs with Slurm dependencies), and datatrove's completion markers decide which tasks
a re-run starts or submits. A task that meets a malformed record raises, so datatrove never marks it complete.
Step statistics go to datatrove's stats files and task logs.

What stays our own, and why:
- Reading (lit_gpt.corpus, not datatrove's JsonlReader/ParquetReader): datatrove's readers give each task whole
  files, but one 100 GB .jsonl.zst must be shared by many tasks, so our shards are byte ranges and row groups cut
  at line boundaries; ids default to `file:line`, and a malformed record is one error naming file and line (or a
  counted skip), where datatrove's readers log and skip. Plain .txt (a document per file or per line) has no reader.
- Dedup (hash/repeats, not datatrove's dedup steps): the rule is "drop every paragraph whose normalized text
  occurred earlier in the corpus", a global first-occurrence decision in corpus order; datatrove's SentenceDedup
  works on three-sentence spans and its exact dedups keep per-task hashes, so the survivors would differ.
- Tokenizing and writing (tokenize/pack, not DocumentTokenizer and its writers): datatrove's writers name files by
  rank and its tokenizer writes its own .ds files, shuffled per file; our output is TinyLlama's LITPKDS chunks of
  a fixed size, cut from the concatenation of all shards, so its bytes must not depend on the number of tasks.
  Chunk c needs the token counts of every earlier shard, hence a pack stage after tokenize.
- So steps exchange files, not Document streams: every stage is a barrier over the whole corpus (a key bucket
  needs every shard's hashes; a chunk needs every earlier part), and each piece is written atomically with a
  "done" file last, so a killed task loses only the piece it was on. Steps end in `yield from ()`.
- The switch (switch.py): publishing the dataset is one atomic rename of OUTPUT/current, with a journal that the
  next run finishes; datatrove has no notion of replacing a previous output.
- Finalize runs in the main process locally; on Slurm it is a one-task SlurmPipelineExecutor after pack. Its
  completion is the dataset (manifests with this run's fingerprint): the switch removes the staging area.
"""
