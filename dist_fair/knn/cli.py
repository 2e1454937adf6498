"""``dist-fair knn``: build the kNN graph of an embedding shard folder on Ray.

    dist-fair knn --shards DIR --out DIR [--k 80] [--index auto|flat|ivf|hnsw|ivfpq|ivfpq_fs] [--workers W]
                  [--nlist N] [--nprobe P] [--hnsw-m M] [--ef-construction E] [--ef-search E]
                  [--pq-m M] [--rerank R] [--recall-sample N] [--gpu auto|yes|no] [--address auto]
                  [--no-verify]

Same code as the pipeline's kNN stage (:func:`dist_fair.knn.build_knn_graph`). Writes
``nbrs.npy``, ``sims.npy`` and ``knn.json`` into ``--out`` and prints a summary. Only the standard
library is imported at module level.
"""
from __future__ import annotations

import argparse
import json

from dist_fair.verify_option import add_no_verify_argument, apply_no_verify

HELP = "build the kNN graph (FAISS index shards on Ray actors): nbrs.npy, sims.npy, knn.json"
DESCRIPTION = (
    "Build the k-nearest-neighbour graph of every sample of an embedding shard folder by cosine "
    "similarity (embeddings are L2-normalised on load). The database is split into --workers contiguous "
    "id ranges, each held by a Ray actor with its own FAISS index (flat = exact; ivf, hnsw, ivfpq = "
    "approximate, with recall@k measured against exact search on --recall-sample random queries). "
    "Output rows are in manifest id order; nbrs[i, 0] = i; similarities decrease; ties go to the lower id."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dist_fair.config import KNNConfig

    d = KNNConfig()
    parser.add_argument("--shards", required=True, metavar="DIR", help="embedding shard folder (with manifest.json)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (nbrs.npy, sims.npy, knn.json)")
    parser.add_argument("--k", type=int, default=d.k, help="neighbours per sample, the sample itself included")
    parser.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw", "ivfpq", "ivfpq_fs"], default=d.index,
                        help="flat = exact; ivf = IVF-Flat; hnsw = HNSW-Flat; ivfpq = IVF-PQ with exact re-ranking; "
                             "ivfpq_fs = FAISS 4-bit PQ fast-scan with exact re-ranking; "
                             "auto = flat while N^2 * dim <= 2e12, else hnsw")
    parser.add_argument("--workers", type=int, default=d.workers, help="index actors (database shards)")
    parser.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker,
                        help="CPUs (and faiss threads) per actor; default: cluster CPUs / workers")
    parser.add_argument("--query-block", type=int, default=d.query_block, help="queries per block")
    parser.add_argument("--nlist", type=int, default=d.nlist, help="IVF lists per shard (default ~4*sqrt(rows))")
    parser.add_argument("--nprobe", type=int, default=d.nprobe, help="IVF lists visited per query "
                        "(default: the index's, 16 for ivf/ivfpq, 256 for ivfpq_fs)")
    parser.add_argument("--ivf-search", choices=["lists", "faiss"], default=d.ivf_search,
                        help="CPU ivf: lists = list by list with matrix products over each query block "
                             "(same candidates as faiss, several times faster); faiss = IndexIVFFlat.search")
    parser.add_argument("--no-symmetrize", action="store_true",
                        help="approximate indexes: skip the reverse-edge refinement (offering i to j when j is "
                             "among i's neighbours: no new distances, recall can only rise)")
    parser.add_argument("--hnsw-m", type=int, default=d.hnsw_m, help="HNSW links per node")
    parser.add_argument("--ef-construction", type=int, default=d.ef_construction, help="HNSW build beam width")
    parser.add_argument("--ef-search", type=int, default=d.ef_search, help="HNSW search beam width")
    parser.add_argument("--pq-m", type=int, default=d.pq_m, help="IVF-PQ sub-quantizers (must divide the "
                        "dimension; default 32 for ivfpq, dim/2 for ivfpq_fs)")
    parser.add_argument("--rerank", type=int, default=d.rerank, help="ivfpq/ivfpq_fs: re-rank rerank*k candidates "
                        "exactly (faiss' k_factor; default 4 for ivfpq, 8 for ivfpq_fs)")
    parser.add_argument("--train-size", type=int, default=d.train_size,
                        help="IVF training rows per shard (default 40*nlist)")
    parser.add_argument("--recall-sample", type=int, default=d.recall_sample,
                        help="random queries checked against exact search (0 = skip)")
    parser.add_argument("--gpu", choices=["auto", "yes", "no"], default=d.gpu,
                        help="faiss GPU for flat/ivf when installed and visible")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed for training samples and the recall sample")
    parser.add_argument("--max-restarts", type=int, default=d.max_restarts, help="restarts of a failed index actor")
    parser.add_argument("--address", default=None,
                        help="Ray to join (auto, ray://host:10001); default: start a local instance")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out holds a complete graph")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_no_verify_argument(parser)


def config_from_args(args: argparse.Namespace):  # -> KNNConfig
    from dist_fair.config import KNNConfig

    return KNNConfig(k=args.k, index=args.index, workers=args.workers, query_block=args.query_block,
                     nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                     ef_search=args.ef_search, pq_m=args.pq_m, rerank=args.rerank, recall_sample=args.recall_sample,
                     gpu=args.gpu, train_size=args.train_size, cpus_per_worker=args.cpus_per_worker,
                     max_restarts=args.max_restarts, seed=args.seed, ivf_search=args.ivf_search,
                     symmetrize=not args.no_symmetrize)


def main(args: argparse.Namespace) -> int:
    from dist_fair.knn.graph import build_knn_graph

    apply_no_verify(args)
    config = config_from_args(args)
    result = build_knn_graph(args.shards, args.out, config, resume=not args.force, progress=not args.no_progress,
                             ray_address=args.address)
    print(json.dumps(result.summary(), indent=2))
    return 0
