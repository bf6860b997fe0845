"""Stream inputs through the gateway and write every face's files, resuming where a run stopped.

The gateway is not trusted: each image is sent under an opaque id the client made (its position in
this run), results are mapped back through that id only, and each result is checked in full
(``validate.py``) before anything is written. A result the client cannot use becomes that face's
(or image's) error line and the run goes on; a result for an id never sent is counted and dropped.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facefuse.client.api import GatewayClient, ImageInput
from facefuse.client.inputs import InputItem, read_bytes, read_rgb
from facefuse.client.outputs import PreviewWriter, ResultsLog, code_name, status_entry, summarize, write_face
from facefuse.client.validate import MAX_MESSAGE, InvalidResponseError, check_face, check_numbers, text
from facefuse.errors import AuthError, BackendUnavailableError, FacefuseError, InvalidInputError

# Statuses the client itself gives (next to the gateway's gRPC code names):
INVALID_RESPONSE = "INVALID_RESPONSE"  # the gateway's result broke the protocol; nothing of it was written
NO_RESULT = "NO_RESULT"  # the stream ended without (all of) this image's results
WRITE_FAILED = "WRITE_FAILED"  # the result was fine but its files could not be written here
MAX_VIOLATIONS = 1000  # protocol violations tolerated in one stream before the client hangs up
SHOWN_VIOLATIONS = 5  # unknown-id warnings printed before they are only counted
PREVIEW_WORKERS = 2  # threads rendering previews and overlays (this machine class has 2 cores)


@dataclass
class RunReport:
    processed: int = 0
    skipped: int = 0
    faces: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    unknown_results: int = 0  # results for image ids this client never sent

    @property
    def failed(self) -> int:
        """Images/faces that did not end OK, an image with no face found (NOT_FOUND) included: the README's
        exit codes treat a missed face as a failure (exit 1), and a rerun retries it."""
        return sum(n for s, n in self.statuses.items() if s != "OK") + self.unknown_results

    @property
    def no_face(self) -> int:
        """Images in which no face was found."""
        return self.statuses.get("NOT_FOUND", 0)


@dataclass
class _Image:
    """What has arrived for one sent image."""

    item: InputItem
    num_faces: int | None = None
    seen: set[int] = field(default_factory=set)
    closed: bool = False  # all its results are in (or a whole-image status came)
    flagged: bool = False  # an image-level error line was written for it
    pixels: np.ndarray | None = None  # decoded once for overlays, dropped when closed


class _Stream:
    """The bookkeeping of one run: sent ids, arrivals, the log; results handled one at a time."""

    def __init__(self, out: Path, log: ResultsLog, method: str, progress: Any) -> None:
        self.out, self.log, self.method, self.progress = out, log, method, progress
        self.all_files = False  # also the rarely needed files (outputs.EXTRAS)
        self.preview = True  # preview.png and uncertainty.png (--no-preview: off)
        self.previews: PreviewWriter | None = None  # the worker pool rendering images off the result path
        self.sent: dict[str, _Image] = {}
        self.entries: list[dict[str, Any]] = []
        self.faces = 0
        self.unknown = 0
        self.violations = 0
        self._lock = threading.Lock()  # the request iterator runs on a gRPC thread and records too

    def record(self, entry: dict[str, Any], image: _Image | None = None) -> None:
        with self._lock:
            self.log.append(entry)
            self.entries.append(entry)
            if image is not None and not image.closed and (entry["face_index"] < 0 or (image.num_faces is not None
                                                            and len(image.seen) >= image.num_faces)):
                image.closed = True
                image.pixels = None
                self.progress.update(1)

    def images(self, todo: list[InputItem], masks: dict[str, np.ndarray]) -> Iterator[ImageInput]:
        for index, item in enumerate(todo):
            try:
                data = read_bytes(item)
            except (OSError, FacefuseError) as exc:
                message = str(exc) if isinstance(exc, FacefuseError) else f"{item.name}: {exc.strerror or exc}"
                self.record(status_entry(item, self.method, "INVALID_ARGUMENT", message))
                self.progress.update(1)
                continue
            wire_id = str(index)
            self.sent[wire_id] = _Image(item)
            yield ImageInput(wire_id, data, masks.get(item.key))

    def handle(self, result: Any) -> None:
        image = self.sent.get(result.image_id)
        if image is None:
            self.unknown += 1
            self._violation()
            if self.unknown <= SHOWN_VIOLATIONS:
                print(f"facefuse: warning: the gateway sent a result for an image id this client never sent "
                      f"({text(repr(result.image_id), 80)}); ignored", file=sys.stderr)
            return
        item = image.item
        new_face = False  # the result claims a face index not seen before: its error line is that face's
        try:
            check_numbers(result)
            if image.closed:
                raise InvalidResponseError("a result after the image was complete")
            index = result.face_index
            if index >= 0:
                if image.num_faces is None:
                    image.num_faces = result.num_faces
                elif result.num_faces != image.num_faces:
                    raise InvalidResponseError(f"num_faces changed from {image.num_faces} to {result.num_faces}")
                if index in image.seen:
                    raise InvalidResponseError(f"face {index} sent twice")
                image.seen.add(index)
                new_face = True
            status = code_name(result.status.code)
            if status != "OK":
                entry = status_entry(item, self.method, status, text(result.status.message, MAX_MESSAGE),
                                     face_index=index, num_faces=result.num_faces)
            else:
                entry = self._write(image, check_face(result, self.method))
        except InvalidResponseError as exc:
            self._violation()
            message = f"the gateway's result was refused: {exc}"
            if not new_face:  # not tied to one face: an image-level line; the image stays open for its real results
                image.flagged = True
                self.record(status_entry(item, self.method, INVALID_RESPONSE, message, num_faces=image.num_faces or 0))
                return
            entry = status_entry(item, self.method, INVALID_RESPONSE, message, face_index=result.face_index,
                                 num_faces=result.num_faces)
        self.record(entry, image)

    def _write(self, image: _Image, face: Any) -> dict[str, Any]:
        item = image.item
        if image.pixels is None:
            image.pixels = _decode_for_overlay(item)
        base = status_entry(item, self.method, "OK", "", face_index=face.face_index, num_faces=face.num_faces)
        try:
            files = write_face(self.out, item.key, face, image.pixels, all_files=self.all_files,
                               previews=self.previews, preview=self.preview)
        except Exception as exc:
            base.update(status=WRITE_FAILED, message=f"could not write this face's files: {type(exc).__name__}: {exc}")
            return base
        self.faces += 1
        return {**base, "seconds": round(face.seconds, 3), **files}

    def _violation(self) -> None:
        self.violations += 1
        if self.violations > MAX_VIOLATIONS:
            raise BackendUnavailableError(f"the gateway sent more than {MAX_VIOLATIONS} unusable results; hanging up")

    def finish(self, todo: list[InputItem]) -> None:
        """The stream ended normally: every input still missing results gets a line saying so."""
        sent = list(self.sent.values())  # the request thread may still be adding: work on a snapshot
        for image in sent:
            if image.closed:
                continue
            if image.num_faces is None:
                if not image.flagged:
                    self.record(status_entry(image.item, self.method, NO_RESULT,
                                             "the gateway ended the stream without a result for this image"), image)
                continue
            for index in sorted(set(range(image.num_faces)) - image.seen):
                image.seen.add(index)
                self.record(status_entry(image.item, self.method, NO_RESULT,
                                         f"the gateway ended the stream without face {index} of {image.num_faces}",
                                         face_index=index, num_faces=image.num_faces), image)
        answered = {image.item.key for image in sent} | {entry["key"] for entry in list(self.entries)}
        for item in todo:
            if item.key not in answered:
                self.record(status_entry(item, self.method, NO_RESULT,
                                         "the gateway ended the stream before it read this image"))


def run_stream(items: list[InputItem], out: Path, client: GatewayClient, method: str, *,
               options: dict[str, Any] | None = None, progress: bool = True,
               masks: dict[str, np.ndarray] | None = None, all_files: bool = False, preview: bool = True,
               preview_workers: int = PREVIEW_WORKERS) -> RunReport:
    """Send every input not done yet, write what comes back; ``masks`` is keyed by ``InputItem.key``.

    Rendered images (previews, overlays) are drawn by ``preview_workers`` threads (0: inline) while
    results keep coming; the run waits for them before it compacts the log and returns.

    Raises InvalidInputError when the gateway refuses the stream's options, BackendUnavailableError when it
    cannot be reached or cuts the stream; finished outputs and their lines stay either way.
    """
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    log = ResultsLog.open(out)
    todo = [item for item in items if not log.is_done(item, method)]
    for item in todo:
        log.forget(item, method)  # its old lines (failures, partial faces) would outlive this run's
    report = RunReport(skipped=len(items) - len(todo))
    started = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc=method, disable=not progress or not todo, file=sys.stderr)
    stream = _Stream(out, log, method, bar)
    stream.all_files = all_files
    stream.preview = preview
    stream.previews = PreviewWriter(workers=preview_workers, pending=2 * max(preview_workers, 1))
    try:
        if not todo:  # everything is done already: no stream to open
            return report
        results = client.process(stream.images(todo, masks or {}), method=method, **(options or {}))
        while True:
            try:
                result = next(results)
            except StopIteration:
                break
            except (InvalidInputError, AuthError):  # the gateway refused the stream's options or credentials
                raise
            except FacefuseError as exc:  # the call itself failed (down, busy, deadline): not one image
                raise BackendUnavailableError(f"the stream ended early: {exc}") from None
            stream.handle(result)
        stream.finish(todo)
    finally:
        stream.previews.close()
        bar.close()
        log.compact()
        report.processed = len(todo)
        report.faces = stream.faces
        report.unknown_results = stream.unknown
        report.statuses = summarize(stream.entries)
        report.seconds = time.perf_counter() - started
    return report


def _decode_for_overlay(item: InputItem) -> np.ndarray | None:
    try:
        return read_rgb(item)
    except (OSError, FacefuseError):
        return None
