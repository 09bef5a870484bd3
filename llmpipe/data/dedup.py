"""Deduplication that keeps the oldest copy: of identical or near-identical documents, the one from
the earliest crawl part survives, so a page a refresh found that copies one the corpus has is dropped.

Exact dedup takes this as datatrove's `document_priority`. MinHash needs two small steps of our own:
datatrove's clustering keeps whichever member its union-by-size makes the root, so the signature
step also writes each document's crawl part (`<rank>.parts`), and the clustering keeps the member
with the lowest (part, file, document). Because the choice depends only on the documents, a
refreshed corpus is the one a from-scratch run on the same WARCs makes (`llmpipe reproduce`).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import SENTINEL, read_tuples_from_file

_PART = re.compile(r"^(?:input-\d{5}-)?part-(\d{5})\.warc")
OTHER_PART = 65534  # WET files and WARCs of other tools: after every crawl part


def crawl_part(doc: Document) -> int:
    """The number of the crawl part (`part-NNNNN.warc.gz`) a document was extracted from."""
    match = _PART.match(Path(doc.metadata.get("file_path", "")).name)
    return min(int(match.group(1)), OTHER_PART - 1) if match else OTHER_PART


def normalized_text(doc: Document) -> str:
    """What exact dedup compares: the text with all whitespace runs collapsed."""
    return " ".join(doc.text.split())


def first_crawled_first(doc: Document) -> int:
    """Exact dedup's `document_priority` (higher is kept): the earliest crawl part."""
    return OTHER_PART + 1 - crawl_part(doc)


class OldestFirstMinhashSignature(MinhashDedupSignature):
    """datatrove's signature step, also writing `parts/<rank>.parts`: each document's crawl part (uint16)."""

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        parts: list[int] = []

        def noting_parts(docs):
            for doc in docs:
                parts.append(crawl_part(doc))
                yield doc

        super().run(noting_parts(data), rank, world_size)
        if parts or not self.output_folder.exists(f"parts/{rank:05d}.parts"):  # a rerun skipping its signatures reads none
            with self.output_folder.open(f"parts/{rank:05d}.parts", "wb") as f:
                f.write(np.asarray(parts, dtype="<u2").tobytes())


class OldestFirstMinhashCluster(MinhashDedupCluster):
    """datatrove's clustering (duplicate pairs -> connected components -> `.remove` files), keeping in each
    cluster the document of the earliest crawl part; ties go to the lowest (file, document)."""

    def __init__(self, input_folder, output_folder, parts_folder, config=None):
        super().__init__(input_folder, output_folder, config=config)
        from datatrove.io import get_datafolder

        self.parts_folder = get_datafolder(parts_folder)

    def _parts(self) -> dict[int, np.ndarray]:
        parts = {}
        for name in self.parts_folder.list_files(glob_pattern="*.parts"):
            with self.parts_folder.open(name, "rb") as f:
                parts[int(Path(name).name.split(".")[0])] = np.frombuffer(f.read(), dtype="<u2")
        return parts

    def run(self, data: DocumentsPipeline = None, _: int = 0, world_size: int = 1):
        assert world_size == 1, "World size must be 1 for clustering"
        dup_files = self.input_folder.list_files(glob_pattern="*.dups")
        parts = self._parts()
        order = lambda node: (int(parts[node[0]][node[1]]), *node)  # noqa: E731  lower: kept
        root: dict[tuple[int, int], tuple[int, int]] = {}

        def find(node):
            root.setdefault(node, node)
            while root[node] != node:
                root[node] = root[root[node]]  # path halving
                node = root[node]
            return node

        with self.track_time():
            for dup_file in dup_files:
                with self.input_folder.open(dup_file, "rb") as f:
                    for f1, d1, f2, d2 in read_tuples_from_file(f, "4I", lines_to_buffer=self.lines_to_buffer):
                        if f1 == SENTINEL:
                            continue  # a match in an index: we build none
                        a, b = find((f1, d1)), find((f2, d2))
                        if a != b:
                            keep, drop = sorted((a, b), key=order)
                            root[drop] = keep
            with self.output_folder.get_output_file_manager(mode="wb") as output:
                for node in sorted(root):
                    self.stat_update("duplicates")
                    if find(node) != node:
                        output.write(f"{node[0]:06d}.remove", struct.pack("<I", node[1]))
                        self.stat_update("to_remove")
