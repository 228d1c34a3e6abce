"""`refusalkit serve`: an OpenAI-compatible chat API for a (steered) model."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from refusalkit.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(app: typer.Typer) -> None:
    from refusalkit.commands.context import options

    @app.command("serve")
    def serve_cmd(
        ctx: typer.Context,
        model: str = typer.Option("qwen2.5-coder-0.5b", "--model", help="Model spec."),
        profile: Path | None = typer.Option(None, "--profile", help="Steering profile folder."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by "
                                 "default; anything else exposes the model)."),
        port: int = typer.Option(8000, "--port"),
        api_key_env: str | None = typer.Option(None, "--api-key-env", help="Environment "
                                               "variable holding the API key to require."),
        model_name: str | None = typer.Option(None, "--served-model-name",
                                              help="Model id reported to clients."),
        max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit"),
        max_prompt_tokens: int = typer.Option(4096, "--max-prompt-tokens"),
        max_concurrency: int = typer.Option(64, "--max-concurrency",
                                            help="Requests in flight before 429."),
        max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes"),
        max_batch: int = typer.Option(16, "--max-batch", help="Rows per forward; 1 = no "
                                      "batching."),
        batch_window_ms: float = typer.Option(10.0, "--batch-window-ms"),
        dtype: str = typer.Option("float32", "--dtype"),
        system_prompt: str | None = typer.Option(None, "--system-prompt"),
        allow_other_model: bool = typer.Option(False, "--allow-other-model"),
    ) -> None:
        """Serve /v1/chat/completions (streaming, logprobs, per-request steering override).

        The profile steers every request unless the request body overrides it with an extra
        `steering` field (OpenAI clients: extra_body={"steering": {...}}):

        \b
          "steering": {"scale": 0.5}      scale the profile's addition strengths (0 = none)
          "steering": {"enabled": false}  no steering at all for this request (ablation too)

        The response echoes what was applied ("steering": {"enabled", "scale"}). One model
        is served: a request naming another model is answered by it anyway; the response's
        "model" names the served model and a "warning" field (and an X-Refusalkit-Warning
        header) says so. GET /v1/models lists the name (--served-model-name).
        """
        import uvicorn

        from refusalkit.interventions import load_profile
        from refusalkit.models import load_model
        from refusalkit.serve import create_app

        opts = options(ctx)
        api_key = None
        if api_key_env is not None:
            api_key = os.environ.get(api_key_env, "")
            if not api_key:
                raise UserError(f"environment variable {api_key_env} is not set or empty; "
                                "export the API key there first")
        for name, value in (("--max-tokens-limit", max_tokens_limit),
                            ("--max-concurrency", max_concurrency),
                            ("--max-body-bytes", max_body_bytes), ("--max-batch", max_batch),
                            ("--max-prompt-tokens", max_prompt_tokens)):
            if value < 1:
                raise UserError(f"{name} must be at least 1")
        lm = load_model(model, dtype=dtype, system_prompt=system_prompt)
        prof = load_profile(profile, lm, allow_other_model=allow_other_model) if profile else None
        app = create_app(lm, prof, api_key=api_key, model_name=model_name,
                         max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens,
                         max_concurrency=max_concurrency, max_body_bytes=max_body_bytes,
                         batch_window_ms=batch_window_ms, max_batch=max_batch)
        if host not in LOOPBACK and api_key is None and not opts.quiet:
            typer.echo(f"warning: serving on {host} without --api-key-env; anyone who can "
                       "reach this address can use the model", err=True)
        if not opts.quiet:
            typer.echo(f"serving {model} on http://{host}:{port}/v1 "
                       f"({'steered by ' + str(profile) if prof else 'unsteered'})", err=True)
        uvicorn.run(app, host=host, port=port, log_level="warning" if opts.quiet else "info")
