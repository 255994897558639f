"""RFC 5626 outbound for a cluster: flows of phones connected to one node, reachable from every node.

Theory of operation
-------------------
A phone behind NAT or on TCP can only be reached over the connection (the *flow*) it opened to the node it
registered with: nobody can dial the ephemeral port its Contact names. So a flow registration (a REGISTER
whose Contact carries `+sip.instance` and `reg-id`, with `Supported: outbound`, RFC 5626 §4.2) received by
node N is stored with two things, both computed here for the registrar (`Outbound.flow_route`):

- a **flow token** (`binding.flow`): `b64url(HMAC(key, payload)[:12] || payload)` where the payload names
  this node (node id and a random boot id, so a restarted node never mistakes an old token for a new
  connection), the transport, the TCP connection id and the remote address (RFC 5626 §5.2: the token
  identifies the flow; the HMAC under a key derived from the cluster secret makes it unforgeable, so a
  token can never make us relay anywhere but to a flow we accepted: no open relay);
- a **Path-like route** to this node carrying the token (`<sip:TOKEN@N_HOST:N_PORT;transport=tcp;lr;ob>`,
  RFC 3327 semantics, stored in `binding.path`). The proxy on ANY node uses a binding's Path as the Route
  of the forwarded INVITE and path[0] as its next hop, so calls to the phone reach node N first.

`Outbound.preroute` is a `SipNode` pre-router registered before the proxy's (the Registrar builds it in its
constructor, and node.py builds the Registrar before the Proxy). It claims a request whose top Route names
this node (its SIP address, a listener, or the service address) with a user part, i.e. a flow token:

1. a token that fails the HMAC or cannot be decoded -> 403 (never relayed; an ACK is dropped);
2. a token of another node or of an earlier run of this one, or whose connection is closed (or now belongs
   to another peer) -> 430 Flow Failed (RFC 5626 §5.3); the previous hop then tries another binding;
3. a request that arrived ON the flow the token names is travelling away from the phone (the phone's own
   in-dialog request sent through the Record-Route we added): not claimed, the proxy handles it (its
   `is_ours` strips our Route values, token or not, and it records BYEs);
4. otherwise the request is forwarded over the flow: our Route value removed, Max-Forwards decremented
   (483 at 0), our Via added, and for a dialog-creating request a Record-Route
   `<sip:TOKEN@FLOW_LOCAL;transport=..;lr;ob>` naming the address the phone connected to (RFC 5626 §5.3:
   the edge proxy record-routes with the token), so in-dialog requests towards the phone come back to
   this flow and the phone sends its own over the same connection.

Forwarding is *stateful* (one client transaction per request; responses relayed through the server
transaction; a CANCEL matching a relayed INVITE is answered 200 and sent downstream once a provisional
arrived, §9.1/§16.10), because the endpoint opens a server transaction for every request and a stateless
forward would leave it open forever. ACKs for 2xx (no transaction) are forwarded statelessly. A transport
error on the flow gives 430, Timer B/F 408.

UDP flows: a flow whose REGISTER arrived on the service address gets no Path (the service address, hence
the phone's NAT binding, moves with the leader, and the proxy already sends from it); any other UDP flow is
routed through its node like a TCP one. (pjsua sends `reg-id` over TCP/TLS only.)

Deliberate limits: a flow lives as long as its node and connection; when either dies the phone must
re-register (RFC 5626 §4.4/§4.5: it notices the connection loss, or its CRLF keep-alive goes unanswered)
and calls meanwhile get 430/480 for that binding. Dialogs established through a flow keep our
Record-Route, so they depend on that node for in-dialog requests (the phone's connection went with it).

Invariants: nothing here raises into the event loop (`preroute` catches everything, answers 500 at worst);
a request is relayed only to a connection this node accepted from the phone whose token it verified; every
relay is forgotten once its server transaction ends (bounded memory).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from .logs import get_logger
from .sipnode import RequestContext, SipNode
from .transport.errors import TransportError as SendFailure
from .transport.flow import Address, Flow, TransportName, strip_brackets, via_destination
from .transport.sip.errors import SipError
from .transport.sip.message import Request, Response
from .transport.sip.transaction import (
    ClientTransaction,
    Event,
    ResponseReceived,
    ServerTransaction,
    Terminated,
    TimedOut,
    TransportError,
    build_cancel,
    derive_branch,
)
from .transport.sip.uri import SipUri

__all__ = [
    "DIALOG_CREATING",
    "FLOW_FAILED",
    "FlowToken",
    "Outbound",
    "decode_flow_token",
    "derive_flow_key",
    "encode_flow_token",
]

log = get_logger("raftpbx.outbound")

FLOW_FAILED = 430  # RFC 5626 §11.5
_KEY_LABEL = b"raftpbx outbound flow token v1"
_MAC_BYTES = 12
MAX_TOKEN_CHARS = 300
DEFAULT_PORT = 5060
DEFAULT_FLOW_TIMER_TCP = 120  # seconds, RFC 5626 §4.4.1
DEFAULT_FLOW_TIMER_UDP = 29
DIALOG_CREATING = frozenset({"INVITE", "SUBSCRIBE", "REFER", "NOTIFY"})  # RFC 3261 §12, RFC 6665 §4.1
_TRANSPORT_CODES: dict[str, TransportName] = {"t": "tcp", "u": "udp"}


def derive_flow_key(cluster_secret: str) -> bytes:
    """The flow token key: HMAC-SHA256(cluster secret, label). Same on every node, never logged."""
    return hmac.new(cluster_secret.encode("utf-8"), _KEY_LABEL, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class FlowToken:
    """What a flow token names: the node (and its run), the transport, the connection and its peer."""

    node_id: str
    boot: str
    transport: TransportName
    connection_id: int
    remote: Address

    def payload(self) -> bytes:
        code = "t" if self.transport == "tcp" else "u"
        host, port = self.remote
        return f"{self.node_id}|{self.boot}|{code}|{self.connection_id}|{host}|{port}".encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def encode_flow_token(key: bytes, token: FlowToken) -> str:
    """The opaque token (URL-safe base64: legal unescaped in a SIP URI user part, RFC 3261 §25.1)."""
    payload = token.payload()
    mac = hmac.new(key, payload, hashlib.sha256).digest()[:_MAC_BYTES]
    return _b64(mac + payload)


def decode_flow_token(key: bytes, text: str) -> FlowToken | None:
    """The flow a token names, or None when it is malformed or its HMAC does not verify (never raises)."""
    if not text or len(text) > MAX_TOKEN_CHARS:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) <= _MAC_BYTES:
        return None
    mac, payload = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()[:_MAC_BYTES]):
        return None
    try:
        node_id, boot, code, conn, host, port = payload.decode("utf-8").rsplit("|", 5)
        transport = _TRANSPORT_CODES[code]
        connection_id, remote_port = int(conn), int(port)
    except (UnicodeDecodeError, ValueError, KeyError):
        return None  # a token we signed is always well formed: only a key shared with a buggy writer gets here
    return FlowToken(node_id, boot, transport, connection_id, (host, remote_port))


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _route_value(token: str, address: Address, transport: TransportName) -> str:
    param = ";transport=tcp" if transport == "tcp" else ""
    return f"<sip:{token}@{_host(address[0])}:{address[1]}{param};lr;ob>"


@dataclass(eq=False)
class _Relay:
    """One request forwarded over a flow through a client transaction."""

    ctx: RequestContext
    request: Request  # as forwarded (our Via on top)
    destination: Address
    transport: TransportName
    tx: ClientTransaction | None = None
    provisional: bool = False
    finished: bool = False
    cancel_wanted: bool = False
    cancel_sent: bool = False


class Outbound:
    """RFC 5626 edge-proxy duties of one node: flow tokens for the registrar, the flow pre-router."""

    def __init__(self, sip: SipNode, *, flow_timer: int | None = None) -> None:
        self.sip = sip
        self.key = derive_flow_key(sip.cfg.cluster_secret)
        self.boot = secrets.token_hex(4)
        configured = getattr(sip.cfg.sip, "flow_timer", None)  # `[sip] flow_timer`, once config.py has it
        chosen = flow_timer if flow_timer is not None else configured
        self.flow_timer: int | None = int(chosen) if chosen else None
        self.counters: dict[str, int] = {
            "flows_registered": 0,
            "relayed": 0,
            "acks_relayed": 0,
            "flow_failed": 0,
            "forbidden": 0,
            "from_flow": 0,
        }
        self._relays: dict[int, _Relay] = {}  # id(server transaction) -> relay
        service = sip.cfg.service_address
        self.service: Address | None = (service.host, service.port) if service is not None else None
        sip.add_prerouter(self.preroute)

    # -- addresses --------------------------------------------------------------------------------------
    @property
    def local(self) -> Address:
        """This node's own SIP address (the bound one when the config asked for an ephemeral port)."""
        listen = self.sip.cfg.sip.listen
        if listen.port == 0:
            endpoint = self.sip.endpoint
            bound = endpoint.tcp_address or endpoint.udp_address
            if bound is not None:
                return (bound[0], bound[1])
        return (listen.host, listen.port)

    def _own_addresses(self) -> set[Address]:
        endpoint = self.sip.endpoint
        own = {self.local}
        for address in (endpoint.udp_address, endpoint.tcp_address):
            if address is not None:
                own.add((address[0], address[1]))
        if self.service is not None:
            own.add(self.service)
        listeners: Iterable[Address] = getattr(endpoint, "listeners", ()) or ()
        own.update((host, port) for host, port in listeners)
        return own

    def _names_us(self, uri: SipUri) -> bool:
        port = uri.port if uri.port is not None else DEFAULT_PORT
        return (strip_brackets(uri.host), port) in self._own_addresses()

    # -- registrar side ---------------------------------------------------------------------------------
    def flow_timer_for(self, transport: TransportName) -> int:
        """The Flow-Timer for a flow over `transport` (RFC 5626 §4.4.1): the configured value, else 120 s
        over TCP (the recommended 95-120 s, well inside the TCP idle timeout) and 29 s over UDP (NAT
        bindings, recommended 24-29 s)."""
        if self.flow_timer is not None:
            return self.flow_timer
        return DEFAULT_FLOW_TIMER_TCP if transport == "tcp" else DEFAULT_FLOW_TIMER_UDP

    def token_for(self, flow: Flow) -> str:
        """The flow token naming `flow` (a connection or UDP peer of this node, in this run)."""
        connection_id = flow.connection_id if flow.transport == "tcp" else 0
        return encode_flow_token(
            self.key, FlowToken(self.sip.node_id, self.boot, flow.transport, connection_id, flow.remote)
        )

    def flow_route(self, flow: Flow) -> tuple[str, tuple[str, ...]]:
        """For a flow registration received on `flow` (RFC 5626 §6, this node being the edge proxy): the token
        to store as the binding's `flow`, and the Path to store (a route to this node carrying the token;
        empty for a UDP flow that arrived on the service address, see the module docstring)."""
        token = self.token_for(flow)
        self.counters["flows_registered"] += 1
        if flow.transport == "udp" and self.service is not None and flow.local == self.service:
            return token, ()
        return token, (_route_value(token, self.local, flow.transport),)

    # -- the pre-router ---------------------------------------------------------------------------------
    def preroute(self, ctx: RequestContext) -> bool:
        """Claim (and answer or forward) requests routed to one of our flow tokens; never raises."""
        request = ctx.request
        if request.method != "CANCEL" and request.headers.get("Route") is None:
            return False  # no Route field (every REGISTER from a phone): nothing routed to a flow token
        try:
            return self._preroute(ctx)
        except SipError:
            return False  # a header the proxy or the dispatcher will reject (400) in its own way
        except Exception as exc:
            log.error("outbound.preroute_failed", method=ctx.method, error=repr(exc))
            if ctx.method != "ACK" and not ctx.replied_final:
                ctx.reply(500)
            return True

    def _preroute(self, ctx: RequestContext) -> bool:
        request = ctx.request
        method = request.method
        if method == "CANCEL":
            return self._cancel(ctx)
        routes = request.routes
        if not routes:
            return False
        top = routes[0].uri
        if not isinstance(top, SipUri) or not top.user or not self._names_us(top):
            return False
        text = top.user
        token = decode_flow_token(self.key, text)
        if token is None:
            self.counters["forbidden"] += 1
            log.info("outbound.bad_token", method=method, source=f"{ctx.source[0]}:{ctx.source[1]}")
            if method != "ACK":
                ctx.reply(403, "Forbidden (bad flow token)")
            return True
        if self._arrived_on(ctx.flow, token):
            self.counters["from_flow"] += 1
            return False  # §5.3: from the phone, away from it: the proxy routes it (and strips our Route)
        destination = self._open_flow(token)
        if destination is None:
            self.counters["flow_failed"] += 1
            log.info("outbound.flow_failed", method=method, node=token.node_id, transport=token.transport,
                     mine=token.node_id == self.sip.node_id and token.boot == self.boot)
            if method != "ACK":
                ctx.reply(FLOW_FAILED, "Flow Failed")  # RFC 5626 §5.3
            return True
        forwarded = request.copy()
        forwarded.headers.remove_first_value("Route")
        max_forwards = request.max_forwards
        if max_forwards == 0:
            if method != "ACK":
                ctx.reply(483)  # RFC 3261 §16.3 step 3
            return True
        forwarded.headers.set("Max-Forwards", str((max_forwards if max_forwards is not None else 71) - 1))
        if method == "ACK":
            self._forward_ack(forwarded, request, token)
            return True
        if method in DIALOG_CREATING and request.to_tag is None:
            flow_local = self._flow_local(token)
            forwarded.headers.add("Record-Route", _route_value(text, flow_local, token.transport), first=True)
        self._relay(ctx, forwarded, destination, token.transport)
        return True

    def _arrived_on(self, flow: Flow | None, token: FlowToken) -> bool:
        if flow is None or flow.transport != token.transport:
            return False
        if token.node_id != self.sip.node_id or token.boot != self.boot:
            return False
        if token.transport == "tcp":
            return bool(flow.connection_id == token.connection_id)
        return bool(flow.remote == token.remote)

    def _open_flow(self, token: FlowToken) -> Address | None:
        """Where to send for `token`, or None if that flow is not ours or is gone."""
        if token.node_id != self.sip.node_id or token.boot != self.boot:
            return None
        if token.transport == "udp":
            return token.remote
        conn = self.sip.endpoint.tcp.connection(token.connection_id)
        if conn is None or conn.remote != token.remote:
            return None
        return conn.remote

    def _flow_local(self, token: FlowToken) -> Address:
        if token.transport == "tcp":
            conn = self.sip.endpoint.tcp.connection(token.connection_id)
            if conn is not None:
                return conn.local
        return self.local

    def _via(self, transport: TransportName, branch: str) -> str:
        host, port = self.local
        return f"SIP/2.0/{transport.upper()} {_host(host)}:{port};branch={branch};rport"

    # -- forwarding -------------------------------------------------------------------------------------
    def _forward_ack(self, forwarded: Request, request: Request, token: FlowToken) -> None:
        branch = derive_branch("outbound-ack", request.call_id, request.from_tag or "", request.to_tag or "",
                               str(request.cseq.seq), request.branch or "")
        forwarded.headers.add("Via", self._via(token.transport, branch), first=True)
        try:
            self.sip.endpoint.send_stateless(forwarded, token.remote, transport=token.transport)
            self.counters["acks_relayed"] += 1
        except (SipError, SendFailure) as exc:
            log.info("outbound.ack_failed", error=str(exc))

    def _relay(self, ctx: RequestContext, forwarded: Request, destination: Address,
               transport: TransportName) -> None:
        server = ctx.transaction
        if server is None:
            return
        branch = derive_branch("outbound", *[str(part) for part in server.key])
        forwarded.headers.add("Via", self._via(transport, branch), first=True)
        relay = _Relay(ctx, forwarded, destination, transport)
        self._relays[id(server)] = relay
        self.sip.watch(server, lambda event: self._on_server_event(server, event))
        if forwarded.method == "INVITE":
            ctx.reply(100)  # §16.2: a stateful proxy answers 100 Trying at once
        try:
            relay.tx = self.sip.send_request(
                forwarded, destination, transport=transport,
                on_event=lambda event: self._on_client_event(relay, event),
            )
            self.counters["relayed"] += 1
        except (SipError, SendFailure) as exc:
            log.info("outbound.relay_failed", method=forwarded.method, error=str(exc))
            self._final(relay, ctx.response(FLOW_FAILED, "Flow Failed"))

    def _on_server_event(self, server: ServerTransaction, event: Event) -> None:
        if isinstance(event, Terminated):
            self._relays.pop(id(server), None)

    def _on_client_event(self, relay: _Relay, event: Event) -> None:
        if isinstance(event, ResponseReceived):
            response = event.response
            if response.status == 100:
                return
            upstream = response.copy()
            upstream.headers.remove_first_value("Via")
            if response.status < 200:
                relay.provisional = True
                if relay.cancel_wanted and not relay.cancel_sent:
                    self._send_cancel(relay)
                relay.ctx.send(upstream)
                return
            if response.status < 300 and relay.finished:
                if not relay.ctx.send(upstream):  # RFC 6026: every 2xx goes upstream
                    self._send_by_via(upstream)
                return
            self._final(relay, upstream)
        elif isinstance(event, TimedOut):
            self._final(relay, relay.ctx.response(408))
        elif isinstance(event, TransportError):
            self._final(relay, relay.ctx.response(FLOW_FAILED, "Flow Failed"))

    def _final(self, relay: _Relay, response: Response) -> None:
        if relay.finished:
            return
        relay.finished = True
        relay.ctx.send(response)

    def _send_by_via(self, response: Response) -> None:
        try:
            via = response.top_via
        except SipError:
            return
        destination, transport = via_destination(via)
        self.sip.endpoint.send_stateless(response, destination, transport=transport)

    # -- CANCEL (§9.2, §16.10) --------------------------------------------------------------------------
    def _cancel(self, ctx: RequestContext) -> bool:
        target = self.sip.endpoint.core.find_cancel_target(ctx.request)
        relay = self._relays.get(id(target)) if target is not None else None
        if relay is None or relay.ctx.transaction is not target:
            return False
        ctx.reply(200)
        if relay.finished:
            return True
        relay.cancel_wanted = True
        if relay.provisional and not relay.cancel_sent:
            self._send_cancel(relay)
        return True

    def _send_cancel(self, relay: _Relay) -> None:
        relay.cancel_sent = True
        try:
            self.sip.send_request(build_cancel(relay.request), relay.destination, transport=relay.transport,
                                  on_event=lambda event: None)
        except (SipError, SendFailure) as exc:
            log.info("outbound.cancel_failed", error=str(exc))

    @property
    def relays(self) -> int:
        """Relays in progress (their server transactions have not ended)."""
        return len(self._relays)
