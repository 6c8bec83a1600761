"""``python -m benchmarks``: every benchmark in turn; tables on stdout, JSON under benchmarks/results/."""

from __future__ import annotations

import sys

import torch


def main() -> None:
    from benchmarks import data, detokenizer, dpo, generation, pipeline
    from benchmarks.common import save, table
    from pigeon.runtime import available_cores

    torch.set_num_threads(available_cores())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, module, kwargs in (("generation", generation, {}), ("dpo", dpo, {}),
                                 ("detokenizer", detokenizer, {}), ("data", data, {})):
        print(f"\n## {name}", flush=True)
        rows = module.run(device=device, **kwargs)
        print(table(rows, list(rows[0])), flush=True)
        save(name, rows)
    print("\n## pipeline", flush=True)
    sys.argv = [sys.argv[0]]
    pipeline.main()


if __name__ == "__main__":
    main()
