"""RouterConfig: the router's settings (HTTP bind, security, limits, generation defaults).

The router reads one environment variable, here (`RouterConfig.with_env`): K2SERVE_API_KEY.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

API_KEY_ENV = "K2SERVE_API_KEY"


class RouterConfig(BaseModel):
    """The router's own settings; cluster/config.py composes them into the `router` section of the YAML."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 picks a free one)")
    api_key: str | None = Field(None, description="Required bearer / x-api-key on every endpoint "
                                "but /health and /ready; None disables auth")
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Largest accepted request body (413 above)")
    model_name: str | None = Field(None, description="Served model id; None uses the worker's model name")
    guided_tool_calls: bool = Field(True, description="With tools and tool_choice auto, constrain the "
                                    "tool-call section (triggered structure) on the worker")
    default_temperature: float = Field(0.6, ge=0, description="Used when a request sets none "
                                       "(K2 recommends 0.6; generation_config.json overrides)")
    default_top_p: float | None = Field(None, gt=0, le=1, description="Used when a request sets none")
    anthropic_temperature_scale: float = Field(0.6, gt=0, description="Anthropic API: real temperature "
                                               "= request temperature x this (as Moonshot's API does)")
    max_n: int = Field(8, ge=1, description="Largest `n` (choices per request)")
    max_stop_strings: int = Field(16, ge=0, description="Most stop strings per request")
    max_top_logprobs: int = Field(20, ge=0, description="Largest top_logprobs")
    max_request_timeout_s: float = Field(3600.0, gt=0, description="Longest a request may run, arrival to last "
                                         "token (a client may ask for less: header x-request-timeout, seconds); "
                                         "the deadline travels to the worker, past it the request ends with 504")
    stream_write_timeout_s: float = Field(30.0, gt=0, description="A streamed response whose client takes no "
                                          "write for this long is cancelled (its worker request aborted)")
    max_buffered_responses: int = Field(1024, ge=1, description="Worker responses the router holds for one "
                                        "request whose client is not reading; beyond it the request is cancelled")
    send_buffer_bytes: int | None = Field(131072, ge=4096, description="Kernel send buffer of each client "
                                          "connection (SO_SNDBUF): bounds what a client that stops reading "
                                          "holds on the router host, so that stream_write_timeout_s notices it; "
                                          "None: the OS's autotuning (megabytes)")

    def with_env(self) -> "RouterConfig":
        """This config with api_key from K2SERVE_API_KEY when it sets none."""
        if self.api_key is None and os.environ.get(API_KEY_ENV):
            return self.model_copy(update={"api_key": os.environ[API_KEY_ENV]})
        return self

    def with_generation_config(self, model_dir: str | Path) -> "RouterConfig":
        """Take default temperature / top_p from the checkpoint's generation_config.json, if present."""
        path = Path(model_dir) / "generation_config.json"
        if not path.exists():
            return self
        gen = json.loads(path.read_text())
        updates = {}
        if isinstance(gen.get("temperature"), (int, float)):
            updates["default_temperature"] = float(gen["temperature"])
        if isinstance(gen.get("top_p"), (int, float)) and 0 < gen["top_p"] <= 1:
            updates["default_top_p"] = float(gen["top_p"])
        return self.model_copy(update=updates)
