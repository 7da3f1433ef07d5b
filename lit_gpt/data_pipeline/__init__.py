"""Corpus -> cleaned, tokenized LITPKDS chunks, as stages of datatrove pipelines (local processes or Slurm arrays).

Stages, each a set of independent tasks that datatrove runs, marks complete and skips on a re-run:
  hash      (cleaning on) per shard: the keys of its paragraphs with their corpus positions, bucketed by key
  repeats   (cleaning on) per key bucket: every occurrence of a key but the first in corpus order
  tokenize  per shard: drop repeated paragraphs, short and out-of-ratio documents; tokenize; split by id hash
  pack      per range of chunks: cut the concatenated shards into LITPKDS chunks with their document indexes
  finalize  one task: manifests, the cleaning report, and one atomic switch to the new dataset
Every stage's output is a function of the corpus order alone (shards are contiguous pieces of the inputs, in
order), so any number of tasks or workers gives the same bytes. Work lives in OUTPUT/.staging until the switch.
"""
