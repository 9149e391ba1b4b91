"""Benchmark of targeted bad-case mining: probes per second, against generation alone.

A probe-mining round (:func:`flywheel.world.loop.mining.mine_probes`) generates its probes with
the shipped world base, judges each image with the ground-truth evaluator and the reward
model, writes the failing ones' PNGs and stores them as signals, chunk by chunk. The
baseline, measured in the same run on the same probes, chunk size and seeds, is the
generation alone (:func:`flywheel.world.evaluation.generate_cases`): the ratio says what
judging and storing cost on top of drawing. Rounds alternate between the two (each mining
round draws new noise seeds, so it stores new hits rather than replaying); the figures are
medians over rounds. The database is an embedded PostgreSQL in a temporary directory
(``--database-url`` to use another; hits are written there). The last line is
``ratio (mining / generation probes per s): X``; 1 would mean judging and storing are free.

    python bench/mining.py --quick      # under 45 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# The repository first: this directory's retrieval.py would shadow the retrieval package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.db import migrate
from flywheel.db.engine import create_db_engine, session_factory
from flywheel.settings import Settings
from flywheel.world.base_model import load_world_reward
from flywheel.world.evaluation import BASE_MODEL, generate_cases
from flywheel.world.evaluator import load_evaluator
from flywheel.world.loop.mining import ProbeBatch, mine_probes
from model.pipeline import Generator

BAND = 77_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few probes (under 45 s)")
    parser.add_argument("--probes", type=int, help="probes per round (32 quick, 128 otherwise)")
    parser.add_argument("--chunk", type=int, default=16, help="probes per generated chunk")
    parser.add_argument("--rounds", type=int, help="rounds of each (2 quick, 4 otherwise)")
    parser.add_argument("--skill", default="colour", help="the probed skill")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    parser.add_argument("--database-url", help="PostgreSQL URL (default: a temporary one)")
    args = parser.parse_args(argv)
    args.probes = args.probes or (32 if args.quick else 128)
    args.rounds = args.rounds or (2 if args.quick else 4)
    if args.probes < 2 or args.chunk < 2 or args.rounds < 1:
        parser.error("--probes and --chunk must be >= 2, --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = Generator.load(BASE_MODEL)
    evaluator, reward = load_evaluator(), load_world_reward()
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        engine = create_db_engine(Settings(database_url=args.database_url, home=home), pool_size=2)
        try:
            migrate.upgrade(engine)
            sessions = session_factory(engine)
            cases = ProbeBatch(skill=args.skill, count=args.probes, band=BAND).cases()
            generate_cases(generator, cases[: args.chunk], seed=0, batch_size=args.chunk)  # warm
            drawing: list[float] = []
            mining: list[float] = []
            hits = 0
            for k in range(args.rounds):
                start = time.perf_counter()
                generate_cases(generator, cases, seed=1000 * k, batch_size=args.chunk)
                drawing.append(args.probes / (time.perf_counter() - start))
                batch = ProbeBatch(skill=args.skill, count=args.probes, band=BAND, seed=1000 * k)
                start = time.perf_counter()
                report = mine_probes(
                    sessions,
                    generator=generator,
                    evaluator=evaluator,
                    reward=reward,
                    model_version="bench",
                    batch=batch,
                    image_dir=home / "mining",
                    chunk=args.chunk,
                )
                mining.append(args.probes / (time.perf_counter() - start))
                hits += report.stored
        finally:
            engine.dispose()
    draw, mine = statistics.median(drawing), statistics.median(mining)
    print(f"probes: {args.probes} x {args.rounds} rounds, chunk {args.chunk}, skill {args.skill}")
    print(f"generation alone: {draw:.1f} probes/s (median)")
    print(f"probe mining:     {mine:.1f} probes/s (median); {hits} hits stored")
    print(f"ratio (mining / generation probes per s): {mine / draw:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
