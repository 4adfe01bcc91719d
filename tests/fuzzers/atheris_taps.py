"""atheris (libFuzzer, coverage-guided) on the SSE taps and the body parser: any bytes, split at a
point the fuzzer picks, must never raise. Run by tests/test_fuzz.py::test_atheris_harness (bounded by
-runs), or by hand for longer: `python tests/fuzzers/atheris_taps.py -max_total_time=60`."""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from proxy.endpoints.body import parse_object
    from proxy.errors import GatewayError
    from proxy.params import ParamsError, decode_header
    from proxy.sse import ChatStreamTap
    from proxy.sse_anthropic import AnthropicStreamTap
    from proxy.sse_gemini import GeminiStreamTap
    from proxy.sse_responses import ResponsesStreamTap

TAPS = (lambda: ChatStreamTap(hide_usage_chunk=True), AnthropicStreamTap, GeminiStreamTap, ResponsesStreamTap)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, len(TAPS) + 1)
    cut = fdp.ConsumeIntInRange(0, 1 << 16)
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    if which == len(TAPS):
        with contextlib.suppress(GatewayError):
            parse_object(raw)
        return
    if which == len(TAPS) + 1:
        with contextlib.suppress(ParamsError):
            decode_header(raw.decode("latin-1"))
        return
    tap = TAPS[which]()
    cut %= len(raw) + 1
    tap.feed(raw[:cut])
    tap.feed(raw[cut:])
    tap.flush()
    tap.messages()
    tap.error_status()


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
