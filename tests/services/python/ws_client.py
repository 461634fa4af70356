#!/usr/bin/env python3
"""ws_client.py: an independent client of walrelay-consumer's WebSocket gateway (`stream`),
written with the `websockets` package only (no walrelay code), for the integration tests and
by hand.

    python.sh python ws_client.py --url ws://127.0.0.1:8090/v1/stream --token T --group g \
        [--tables 'public.*'] [--from earliest|latest] [--token-via header|protocol]
        [--max-events N] [--until-caught-up] [--after-caught-up N] [--duration S]
        [--idle-exit S] [--ack-every N] [--final-ack all|none|all-but-last:N]
        [--stall-after N --stall-for S] [--send TEXT]... [--print all|control|none]

Every frame received is printed on stdout as one JSON line, as it came (`--print control`
leaves event frames out, `none` prints only the summary). Lines the client adds start with
`"type":"_`:

- `{"type":"_http","status":S,"body":B}`: the server refused the upgrade (exit 0);
- `{"type":"_closed","code":C,"reason":R}`: the server closed the connection;
- `{"type":"_stalled","events":N}` and `{"type":"_resumed"}`: `--stall-after N --stall-for S`
  stopped reading (and acknowledging) after N events, for S seconds, then went on (a slow
  client: the gateway's frames wait in the socket's buffers meanwhile);
- `{"type":"_summary","events":N,"acked":{"topic/partition":offset},"seconds":T,
  "events_per_second":R}`: last line, always.

Acks: `--ack-every N` acknowledges, after every N events, the highest offset received per
topic-partition; `--final-ack` says what is acknowledged before the client closes: `all`
(default), `none`, or `all-but-last:N` (everything except the last N events received, so a
reconnect with the same group gets exactly those again). The client stops at the first of
`--max-events`, `caught_up` (`--until-caught-up`), N events after it (`--after-caught-up`),
`--duration`, `--idle-exit` seconds without a frame, or the server closing. `--send TEXT`
sends a raw text frame right after connecting (malformed frames, acks of unknown offsets).
"""

import argparse
import asyncio
import base64
import json
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--token", default="")
    p.add_argument("--token-via", choices=["header", "protocol"], default="header")
    p.add_argument("--group")
    p.add_argument("--tables")
    p.add_argument("--from", dest="start")
    p.add_argument("--query", help="raw query string instead of group/tables/from")
    p.add_argument("--max-events", type=int, default=0)
    p.add_argument("--until-caught-up", action="store_true")
    p.add_argument("--after-caught-up", type=int, default=-1)
    p.add_argument("--duration", type=float, default=0)
    p.add_argument("--idle-exit", type=float, default=0)
    p.add_argument("--ack-every", type=int, default=0)
    p.add_argument("--final-ack", default="all")
    p.add_argument("--stall-after", type=int, default=0)
    p.add_argument("--stall-for", type=float, default=0)
    p.add_argument("--send", action="append", default=[])
    p.add_argument("--print", dest="show", choices=["all", "control", "none"], default="all")
    return p.parse_args()


def out(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def url_of(a):
    if a.query is not None:
        return f"{a.url}?{a.query}"
    from urllib.parse import urlencode

    q = {}
    if a.group is not None:
        q["group"] = a.group
    if a.tables is not None:
        q["tables"] = a.tables
    if a.start is not None:
        q["from"] = a.start
    return f"{a.url}?{urlencode(q)}" if q else a.url


async def run(a):
    headers, protocols = {}, None
    if a.token_via == "header":
        headers["Authorization"] = f"Bearer {a.token}"
    else:
        b64 = base64.urlsafe_b64encode(a.token.encode()).decode().rstrip("=")
        protocols = ["walrelay.v1", f"base64url.bearer.authorization.walrelay.{b64}"]
    events = []  # (topic, partition, offset), in arrival order
    highest = {}  # (topic, partition) -> highest offset received
    acked = {}
    started = time.monotonic()
    caught_up_at = None
    since_ack = 0
    stalled = False

    async def ack(ws, upto):
        for (t, p), o in sorted(upto.items()):
            if acked.get((t, p), -1) >= o:
                continue
            await ws.send(json.dumps({"type": "ack", "topic": t, "partition": p, "offset": o}))
            acked[(t, p)] = o

    try:
        async with connect(
            url_of(a),
            additional_headers=headers,
            subprotocols=protocols,
            max_size=None,
            open_timeout=30,
            close_timeout=5,
        ) as ws:
            for text in a.send:
                await ws.send(text)
            last_frame = time.monotonic()
            while True:
                now = time.monotonic()
                if a.duration and now - started >= a.duration:
                    break
                if a.idle_exit and now - last_frame >= a.idle_exit:
                    break
                try:
                    raw = await asyncio.wait_for(ws.recv(), timeout=0.5)
                except asyncio.TimeoutError:
                    # Quiet: acknowledge what is received but not yet acknowledged.
                    if a.ack_every and since_ack:
                        await ack(ws, highest)
                        since_ack = 0
                    continue
                last_frame = time.monotonic()
                frame = json.loads(raw)
                kind = frame.get("type")
                if a.show == "all" or (a.show == "control" and kind != "event"):
                    sys.stdout.write(raw if isinstance(raw, str) else raw.decode())
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                if kind == "event":
                    key = (frame["topic"], frame["partition"])
                    events.append((frame["topic"], frame["partition"], frame["offset"]))
                    highest[key] = max(highest.get(key, -1), frame["offset"])
                    since_ack += 1
                    if a.ack_every and since_ack >= a.ack_every:
                        await ack(ws, highest)
                        since_ack = 0
                    if a.max_events and len(events) >= a.max_events:
                        break
                    if a.stall_after and not stalled and len(events) >= a.stall_after:
                        stalled = True
                        out({"type": "_stalled", "events": len(events)})
                        await asyncio.sleep(a.stall_for)
                        out({"type": "_resumed"})
                        last_frame = time.monotonic()
                    if (
                        caught_up_at is not None
                        and a.after_caught_up >= 0
                        and len(events) - caught_up_at >= a.after_caught_up
                    ):
                        break
                elif kind == "caught_up":
                    caught_up_at = len(events)
                    if a.until_caught_up or a.after_caught_up == 0:
                        break
            # The final acknowledgement.
            if a.final_ack == "all":
                await ack(ws, highest)
            elif a.final_ack.startswith("all-but-last:"):
                keep = int(a.final_ack.split(":", 1)[1])
                upto = {}
                for t, p, o in events[: max(0, len(events) - keep)]:
                    upto[(t, p)] = max(upto.get((t, p), -1), o)
                await ack(ws, upto)
            # Let the gateway read the acks before the close.
            await asyncio.sleep(0.3)
    except InvalidStatus as e:
        body = e.response.body.decode(errors="replace") if e.response.body else ""
        out({"type": "_http", "status": e.response.status_code, "body": body})
    except ConnectionClosed as e:
        rcvd = e.rcvd
        out(
            {
                "type": "_closed",
                "code": rcvd.code if rcvd else None,
                "reason": rcvd.reason if rcvd else None,
            }
        )
    seconds = time.monotonic() - started
    out(
        {
            "type": "_summary",
            "events": len(events),
            "acked": {f"{t}/{p}": o for (t, p), o in sorted(acked.items())},
            "seconds": round(seconds, 3),
            "events_per_second": round(len(events) / seconds, 1) if seconds > 0 else 0,
        }
    )


def main():
    asyncio.run(run(parse_args()))


if __name__ == "__main__":
    main()
