"""Run by tests/test_data_multihost.py: one of two processes (jax.distributed, gloo, one CPU device each) opening
the token cache of one JSONL file. Prints one JSON line: the blocks this process tokenised and the documents.

argv: process id, port, data file, tokenizer folder, cache folder, rows per block.
"""

import json
import sys

import jax


def main(pid, port, data, tok_folder, cache, block_rows):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
    from tx.tokenizer import load_tokenizer
    from tx.train import data as txdata
    from tx.train import readers

    readers.BLOCK_ROWS = int(block_rows)
    seen = []
    real = txdata.tokenize_rows

    def counting(tokenizer, columns, rows):
        seen.append(rows[0][0])  # where the block's first row is
        return real(tokenizer, columns, rows)

    txdata.tokenize_rows = counting
    store = txdata.tokens(data, load_tokenizer(tok_folder), cache_dir=cache)
    docs = [store.document(i)[0].tolist() for i in range(store.num_documents)]
    labels = [store.document(i)[1].astype(int).tolist() for i in range(store.num_documents)]
    print(json.dumps({"blocks": seen, "ids": docs, "labels": labels, "path": str(store.path)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
