"""DICOM networking (pynetdicom): the listener, a C-STORE SCP that writes what it receives into
``incoming/``, and the PACS client: C-ECHO, C-FIND, and C-MOVE or C-GET of whole studies.

The listener never touches the archive: each instance is written into ``incoming/`` under a
hidden temporary name (``.tmp-*``, which ingest ignores), fsynced and renamed, and only then is
success (0x0000) answered; ingest stays the only way into the archive. A C-GET stores the
same way, in this process.

A retrieve run asks the PACS (C-FIND, STUDY level) for the studies of the last
``retrieve.lookback_days`` days, keeps those the filters accept, skips each study the catalog
already holds in full (as many instances as the PACS's NumberOfStudyRelatedInstances), and
retrieves the others one study at a time: one study is one failure boundary, recorded in the
catalog and retried at the next run. Instances it brings twice are dropped by ingest's dedup.

No patient name or ID in log lines: studies are named by their StudyInstanceUID.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import ipaddress
import logging
import os
import re
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    StoragePresentationContexts,
    build_role,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from daemon.catalog import Catalog, PrunableStudy
from daemon.config import ListenerConfig, RetrieveConfig
from daemon.fsops import TEMP_PREFIX

logger = logging.getLogger(__name__)

RETRIEVE_JOB = "retrieve"

# PS3.4 Annex B.2.3 / PS3.7 C: the statuses the listener answers with.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
# PS3.7 C.4.2.1.4 (C-MOVE/C-GET): sub-operations still running.
_PENDING = (0xFF00, 0xFF01)
_UID = re.compile(r"[0-9.]{1,64}")
# What a C-GET offers to receive: uncompressed, and the compressed syntaxes a PACS may hold.
_GET_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
# PS3.8 9.3.2.2: at most 128 presentation contexts; one is the C-GET model itself.
_MAX_GET_STORAGE_CONTEXTS = 127


class ListenerError(Exception):
    """The listener cannot start; the message says what to fix."""


class PacsError(Exception):
    """The PACS cannot be reached or refused us; the message names it and what to fix."""


# ---- writing a received instance into incoming/ ------------------------------------------


def write_into_incoming(incoming: Path, encoded: bytes, sop_instance_uid: str) -> Path:
    """Write one received instance (a PS3.10 file: preamble, meta, dataset) into ``incoming``
    atomically: under a hidden temporary name, fsynced, then renamed. Returns the final path.
    A unique suffix keeps two deliveries of one instance apart (ingest dedups them)."""
    stem = sop_instance_uid if _UID.fullmatch(sop_instance_uid) else "instance"
    name = f"{stem}.{uuid.uuid4().hex[:12]}.dcm"
    temporary = incoming / f"{TEMP_PREFIX}{name}"
    final = incoming / name
    try:
        with open(temporary, "xb") as out:
            out.write(encoded)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    # The rename itself survives a power loss only once the folder is synced.
    directory = os.open(incoming, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return final


class _StoreHandler:
    """The C-STORE handler of the listener and of C-GET: success only once the instance is
    safely in incoming/."""

    def __init__(self, incoming: Path, where: str) -> None:
        self._incoming = incoming
        self._where = where
        self._lock = threading.Lock()
        self.stored = 0
        self.failed = 0

    def __call__(self, event: Any) -> int:
        sop_instance_uid = str(event.request.AffectedSOPInstanceUID or "")
        peer = _peer(event.assoc)
        try:
            write_into_incoming(self._incoming, event.encoded_dataset(), sop_instance_uid)
        except OSError as exc:
            self._count(failed=True)
            logger.error(
                "%s: instance %s from %s not stored: cannot write into %s: %s; answered "
                "0xA700 (out of resources), the sender may retry",
                self._where,
                sop_instance_uid,
                peer,
                self._incoming,
                exc.strerror or exc,
            )
            return STATUS_OUT_OF_RESOURCES
        except Exception:  # one instance is the failure boundary; the association goes on
            self._count(failed=True)
            logger.exception(
                "%s: instance %s from %s not stored; answered 0xC000",
                self._where,
                sop_instance_uid,
                peer,
            )
            return STATUS_CANNOT_UNDERSTAND
        self._count(failed=False)
        return STATUS_SUCCESS

    def _count(self, *, failed: bool) -> None:
        with self._lock:
            if failed:
                self.failed += 1
            else:
                self.stored += 1


def _peer(assoc: Association) -> str:
    requestor = assoc.requestor
    return f"AE {requestor.ae_title!r} at {requestor.address}:{requestor.port}"


# ---- the listener ------------------------------------------------------------------------


class _FilteringServer(ThreadedAssociationServer):
    """pynetdicom's server, closing connections from addresses not allowed before any DICOM
    is exchanged (socketserver's verify_request hook)."""

    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed_networks:
            return True
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if address_allowed(host, self.allowed_networks):
            return True
        logger.warning(
            "listener: connection from %s refused: not in listener.allowed_addresses", host
        )
        return False

    def shutdown(self) -> None:
        # Made by make_server, not start_server: the AE does not list it, so pynetdicom's
        # shutdown (which unlists it) does not apply. Closing joins the associations' threads.
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def address_allowed(
    host: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == network.version and address in network for network in networks)


class Listener:
    """The C-STORE SCP (and C-ECHO) on ``listener.address:port`` as ``listener.ae_title``,
    accepting associations only from ``allowed_ae_titles`` (and ``allowed_addresses``)."""

    def __init__(self, settings: ListenerConfig, incoming: Path) -> None:
        self._settings = settings
        self._incoming = incoming
        self._store = _StoreHandler(incoming, "listener")
        self._server: _FilteringServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the configured one; the bound one for port 0 in tests)."""
        if self._server is None:
            return self._settings.port
        return int(self._server.server_address[1])

    @property
    def stored(self) -> int:
        return self._store.stored

    @property
    def failed(self) -> int:
        return self._store.failed

    def start(self) -> None:
        settings = self._settings
        ae = AE(ae_title=settings.ae_title)
        ae.require_calling_aet = list(settings.allowed_ae_titles)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for context in StoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.maximum_associations = 16
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        try:
            server = ae.make_server(
                (settings.address, settings.port),
                evt_handlers=handlers,
                server_class=_FilteringServer,
            )
        except OSError as exc:
            raise ListenerError(_bind_problem(settings, exc)) from exc
        server = cast(_FilteringServer, server)  # the server_class asked for
        server.allowed_networks = tuple(
            ipaddress.ip_network(text, strict=False) for text in settings.allowed_addresses
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="dicom-listener", daemon=True
        )
        self._thread.start()
        logger.info(
            "listener: AE %s on %s:%d, accepting %s%s; writing into %s",
            settings.ae_title,
            settings.address,
            self.port,
            ", ".join(settings.allowed_ae_titles),
            f" from {', '.join(settings.allowed_addresses)}" if settings.allowed_addresses else "",
            self._incoming,
        )

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop accepting, let the associations in progress finish their current instance."""
        if self._server is None:
            return
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        self._server = None
        logger.info("listener stopped: %d instances stored, %d refused", self.stored, self.failed)

    def _on_rejected(self, event: Any) -> None:
        title = str(event.assoc.requestor.ae_title).strip()
        if title not in self._settings.allowed_ae_titles:
            logger.warning(
                "listener: association from %s rejected: calling AE title %r is not in "
                "listener.allowed_ae_titles",
                _peer(event.assoc),
                title,
            )
        else:
            logger.warning(
                "listener: association from %s rejected (too many at once)", _peer(event.assoc)
            )


def _bind_problem(settings: ListenerConfig, exc: OSError) -> str:
    where = f"{settings.address}:{settings.port}"
    if exc.errno == errno.EADDRINUSE:
        fix = (
            "another program (another dcmdb, a PACS, storescp) listens there; stop it or set "
            "listener.port to a free port"
        )
    elif exc.errno == errno.EACCES:
        fix = (
            "ports below 1024 need privileges: use a port >= 1024 (e.g. 11112) or grant "
            "CAP_NET_BIND_SERVICE to the service"
        )
    elif exc.errno == errno.EADDRNOTAVAIL:
        fix = "listener.address is not an address of this server; use one it has, or 0.0.0.0"
    else:
        fix = "check listener.address and listener.port"
    return f"listener: cannot listen on {where}: {exc.strerror or exc}; {fix}"


# ---- the PACS client ---------------------------------------------------------------------


def _pacs_name(settings: RetrieveConfig) -> str:
    return f"the PACS (AE {settings.pacs_ae_title} at {settings.pacs_host}:{settings.pacs_port})"


def _require_pacs(settings: RetrieveConfig) -> None:
    if not settings.pacs_configured:
        raise PacsError(
            "no PACS configured: set retrieve.pacs_host, retrieve.pacs_port and "
            "retrieve.pacs_ae_title in the config (see README, Retrieve)"
        )


@contextlib.contextmanager
def _association(
    settings: RetrieveConfig,
    contexts: Iterable[tuple[str, Sequence[str]]],
    *,
    roles: Sequence[Any] = (),
    handlers: Sequence[Any] = (),
) -> Iterator[Association]:
    """An association with the PACS, released on exit; PacsError with what to fix when none
    can be made."""
    _require_pacs(settings)
    pacs = _pacs_name(settings)
    # A plain TCP connect first: "connection refused" and "no such host" are the common
    # mistakes, and pynetdicom reports them only as "association failed".
    try:
        with socket.create_connection(
            (settings.pacs_host, settings.pacs_port), timeout=settings.timeout_seconds
        ):
            pass
    except OSError as exc:
        raise PacsError(
            f"cannot connect to {pacs}: {exc.strerror or exc}; check retrieve.pacs_host and "
            "retrieve.pacs_port, that the PACS is running, and that no firewall blocks the port"
        ) from exc
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = settings.timeout_seconds
    ae.dimse_timeout = settings.timeout_seconds
    ae.network_timeout = settings.timeout_seconds
    for abstract_syntax, transfer_syntaxes in contexts:
        ae.add_requested_context(abstract_syntax, list(transfer_syntaxes))
    assoc = ae.associate(
        settings.pacs_host,
        settings.pacs_port,
        ae_title=settings.pacs_ae_title,
        ext_neg=list(roles) or None,
        evt_handlers=list(handlers) or None,
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            raise PacsError(
                f"{pacs} rejected the association from our AE title {settings.ae_title}: "
                f"register {settings.ae_title} (with this server's address) at the PACS, and "
                "check that retrieve.pacs_ae_title is the PACS's own AE title"
            )
        raise PacsError(
            f"{pacs} accepted the connection but no DICOM association was made (aborted or "
            f"timed out after {settings.timeout_seconds:g} s); check that the port is the "
            "PACS's DICOM port, not its web port"
        )
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def echo_pacs(settings: RetrieveConfig) -> str:
    """C-ECHO the PACS; the success line, or PacsError saying what to fix."""
    started = time.monotonic()
    with _association(settings, [(Verification, ["1.2.840.10008.1.2"])]) as assoc:
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        if code != STATUS_SUCCESS:
            shown = "no answer" if code is None else f"status 0x{int(code):04X}"
            raise PacsError(
                f"{_pacs_name(settings)} accepted our association (AE {settings.ae_title}) "
                f"but its C-ECHO failed ({shown})"
            )
    return (
        f"C-ECHO to {_pacs_name(settings)} from AE {settings.ae_title}: OK in "
        f"{(time.monotonic() - started) * 1000:.0f} ms"
    )


@dataclass(frozen=True, slots=True)
class PacsStudy:
    """A study as the PACS's C-FIND describes it."""

    study_instance_uid: str
    study_date: str
    study_description: str
    referring_physician: str
    modalities: tuple[str, ...]
    instances: int | None  # NumberOfStudyRelatedInstances; None when the PACS did not say


def _study_query(study_date: str = "", study_instance_uid: str = "") -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid
    query.StudyDate = study_date
    query.StudyDescription = ""
    query.ReferringPhysicianName = ""
    query.ModalitiesInStudy = ""
    query.NumberOfStudyRelatedInstances = ""
    return query


def _find(assoc: Association, query: Dataset, pacs: str) -> list[PacsStudy]:
    studies: list[PacsStudy] = []
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        code = getattr(status, "Status", None)
        if code is None:
            raise PacsError(f"{pacs} did not answer the C-FIND (timeout or abort)")
        if code in _PENDING and identifier is not None:
            studies.append(_pacs_study(identifier))
        elif code != STATUS_SUCCESS and code not in _PENDING:
            raise PacsError(f"{pacs} failed the C-FIND: status 0x{int(code):04X}")
    return studies


def _pacs_study(identifier: Dataset) -> PacsStudy:
    modalities = identifier.get("ModalitiesInStudy", "") or ()
    if isinstance(modalities, str):
        modalities = (modalities,)
    count = identifier.get("NumberOfStudyRelatedInstances", None)
    instances: int | None
    try:
        instances = None if count in (None, "") else int(count)
    except (TypeError, ValueError):
        instances = None
    return PacsStudy(
        study_instance_uid=str(identifier.get("StudyInstanceUID", "")),
        study_date=str(identifier.get("StudyDate", "") or ""),
        study_description=str(identifier.get("StudyDescription", "") or ""),
        referring_physician=str(identifier.get("ReferringPhysicianName", "") or ""),
        modalities=tuple(str(item).upper() for item in modalities if item),
        instances=instances,
    )


def find_study(settings: RetrieveConfig, study_instance_uid: str) -> PacsStudy | None:
    """The PACS's description of one study; None when it does not hold it."""
    with _association(
        settings, [(StudyRootQueryRetrieveInformationModelFind, ["1.2.840.10008.1.2"])]
    ) as assoc:
        found = _find(assoc, _study_query(study_instance_uid=study_instance_uid), "the PACS")
    return next((study for study in found if study.study_instance_uid == study_instance_uid), None)


def study_filter_reason(settings: RetrieveConfig, study: PacsStudy) -> str | None:
    """Why the retrieve filters leave the study out; None when they accept it."""
    if settings.modalities and not set(settings.modalities) & set(study.modalities):
        return f"modalities {'/'.join(study.modalities) or 'unknown'} not in retrieve.modalities"
    for key, pattern, value in (
        ("study_description", settings.study_description, study.study_description),
        ("referring_physician", settings.referring_physician, study.referring_physician),
    ):
        if pattern and not fnmatch.fnmatchcase(value.casefold(), pattern.casefold()):
            return f"does not match retrieve.{key}"
    return None


@dataclass
class RetrieveRun:
    """What one retrieve run found and did."""

    date_range: str
    found: int = 0
    filtered_out: int = 0
    complete: int = 0  # already held in full: skipped
    retrieved: int = 0
    instances: int = 0  # instances the PACS sent (sub-operations completed)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (study UID, error)
    started_at: float = 0.0
    finished_at: float = 0.0

    def describe(self) -> str:
        text = (
            f"StudyDate {self.date_range}: {self.found} studies on the PACS, "
            f"{self.filtered_out} filtered out, {self.complete} already complete, "
            f"{self.retrieved} retrieved ({self.instances} instances), "
            f"{len(self.failures)} failed"
        )
        if self.failures:
            text += f" (retried at the next run; first: {self.failures[0][1]})"
        return text


def lookback_range(today: date, lookback_days: int) -> str:
    """The StudyDate range of a scheduled run: ``lookback_days`` days back, through today."""
    return f"{today - timedelta(days=lookback_days):%Y%m%d}-{today:%Y%m%d}"


def run_retrieve(
    settings: RetrieveConfig,
    move_destination: str,
    incoming: Path,
    catalog: Catalog,
    *,
    date_range: str,
    stop: threading.Event | None = None,
) -> RetrieveRun:
    """One retrieve run (see the module docstring). Studies recorded as failed by an earlier
    run are retried even when their date is outside ``date_range``. Raises PacsError when the
    PACS cannot be queried at all."""
    run = RetrieveRun(date_range=date_range, started_at=time.time())
    pacs = _pacs_name(settings)
    with _association(
        settings, [(StudyRootQueryRetrieveInformationModelFind, ["1.2.840.10008.1.2"])]
    ) as assoc:
        studies = _find(assoc, _study_query(study_date=date_range), pacs)
        listed = {study.study_instance_uid for study in studies}
        for failure in catalog.retrieve_failures():
            if failure.study_instance_uid in listed:
                continue
            again = _find(assoc, _study_query(study_instance_uid=failure.study_instance_uid), pacs)
            if not again:
                logger.warning(
                    "retrieve: study %s failed before and is no longer on %s: not retried",
                    failure.study_instance_uid,
                    pacs,
                )
                catalog.clear_retrieve_failure(failure.study_instance_uid)
            studies.extend(again[:1])
    run.found = len(studies)
    for study in studies:
        if stop is not None and stop.is_set():
            break
        uid = study.study_instance_uid
        if reason := study_filter_reason(settings, study):
            logger.debug("retrieve: study %s skipped: %s", uid, reason)
            run.filtered_out += 1
            continue
        held = catalog.study_instance_count(uid)
        if study.instances is not None and held >= study.instances:
            logger.debug("retrieve: study %s complete (%d instances): skipped", uid, held)
            catalog.clear_retrieve_failure(uid)
            run.complete += 1
            continue
        try:
            sent = _retrieve_study(settings, move_destination, incoming, uid)
        except PacsError as exc:
            logger.error("retrieve: study %s failed: %s", uid, exc)
            catalog.record_retrieve_failure(uid, str(exc), time.time())
            run.failures.append((uid, str(exc)))
            continue
        except Exception as exc:  # one study is the failure boundary
            logger.exception("retrieve: study %s failed", uid)
            catalog.record_retrieve_failure(uid, f"{type(exc).__name__}: {exc}", time.time())
            run.failures.append((uid, f"{type(exc).__name__}: {exc}"))
            continue
        logger.info(
            "retrieve: study %s: %d instances into %s (%d were held)", uid, sent, incoming, held
        )
        catalog.clear_retrieve_failure(uid)
        run.retrieved += 1
        run.instances += sent
    run.finished_at = time.time()
    logger.info("retrieve run: %s", run.describe())
    return run


def _retrieve_study(
    settings: RetrieveConfig, move_destination: str, incoming: Path, study_instance_uid: str
) -> int:
    """C-MOVE or C-GET one study; the number of instances sent, or PacsError."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid
    pacs = _pacs_name(settings)
    if settings.method == "move":
        with _association(
            settings, [(StudyRootQueryRetrieveInformationModelMove, ["1.2.840.10008.1.2"])]
        ) as assoc:
            responses = assoc.send_c_move(
                query, move_destination, StudyRootQueryRetrieveInformationModelMove
            )
            return _sub_operations(responses, pacs, "C-MOVE", move_destination)
    store = _StoreHandler(incoming, "retrieve (C-GET)")
    storage = [
        context.abstract_syntax
        for context in StoragePresentationContexts[:_MAX_GET_STORAGE_CONTEXTS]
        if context.abstract_syntax is not None
    ]
    contexts: list[tuple[str, Sequence[str]]] = [
        (StudyRootQueryRetrieveInformationModelGet, ["1.2.840.10008.1.2"])
    ]
    contexts += [(uid, _GET_TRANSFER_SYNTAXES) for uid in storage]
    with _association(
        settings,
        contexts,
        roles=[build_role(uid, scp_role=True) for uid in storage],
        handlers=[(evt.EVT_C_STORE, store)],
    ) as assoc:
        responses = assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
        sent = _sub_operations(responses, pacs, "C-GET", "")
    if store.failed:
        raise PacsError(f"{store.failed} instances could not be written into {incoming}")
    return sent


def _sub_operations(
    responses: Iterable[tuple[Dataset, Dataset | None]], pacs: str, what: str, destination: str
) -> int:
    final: Dataset | None = None
    for status, _identifier in responses:
        if getattr(status, "Status", None) is None:
            raise PacsError(f"{pacs} did not answer the {what} (timeout or abort)")
        final = status
    if final is None:
        raise PacsError(f"{pacs} did not answer the {what}")
    code = int(final.Status)
    completed = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
    warning = int(final.get("NumberOfWarningSuboperations", 0) or 0)
    if code == STATUS_SUCCESS and failed == 0:
        return completed + warning
    if code == 0xA801:  # PS3.4 C.4.2.1.4: move destination unknown
        raise PacsError(
            f"{pacs} does not know the move destination AE {destination}: register it at "
            "the PACS with this server's address and listener.port, or use retrieve.method = "
            '"get"'
        )
    raise PacsError(
        f"{pacs} answered the {what} with status 0x{code:04X}: {completed} instances sent, "
        f"{failed} failed"
    )


# ---- retention.require_pacs_copy -----------------------------------------------------------


def pacs_copy_check(
    settings: RetrieveConfig, catalog: Catalog
) -> Callable[[PrunableStudy], str | None]:
    """For retention's apply_prune: a reason to keep a study unless the PACS holds all the
    instances the catalog holds of it (C-FIND at study level); None when it may go."""
    pacs = _pacs_name(settings)

    def verify(study: PrunableStudy) -> str | None:
        held = catalog.study_instance_count(study.study_instance_uid)
        try:
            found = find_study(settings, study.study_instance_uid)
        except PacsError as exc:
            return (
                f"{pacs} could not be asked whether it holds the study ({exc}) "
                "(retention.require_pacs_copy)"
            )
        if found is None:
            return f"{pacs} does not hold the study (retention.require_pacs_copy)"
        if found.instances is None:
            return (
                f"{pacs} did not report NumberOfStudyRelatedInstances, so a full copy cannot "
                "be confirmed (retention.require_pacs_copy)"
            )
        if found.instances < held:
            return (
                f"{pacs} holds {found.instances} of its {held} instances "
                "(retention.require_pacs_copy)"
            )
        return None

    return verify
