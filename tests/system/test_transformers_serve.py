"""The chat path against a real `transformers serve` on loopback, running a tiny model saved to disk (offline)."""
import asyncio
import os
import subprocess
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from schemas.config import Backend
from support.localnet import free_port
from testing.models import tiny_model
from workers.llm.backends.base import TransientLLMError
from workers.llm.backends.local import CHATML
from workers.llm.backends.openai_compat import OpenAICompatBackend

SERVE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "transformers"


@pytest.mark.slow
def test_chat_through_transformers_serve(tmp_path):
    lm = tiny_model("llama")
    lm.tokenizer.chat_template = CHATML
    model_dir = tmp_path / "tiny-llama"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(SERVE), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "transformers serve did not come up"
            time.sleep(0.5)
        cfg = Backend(kind="openai", model=str(model_dir), base_url=f"http://127.0.0.1:{port}/v1", api_key_env=None,
                      timeout_s=60)
        backend = OpenAICompatBackend(cfg, env={})

        async def run():
            try:
                return await backend.chat([{"role": "user", "content": "Describe the neuron."}], max_tokens=5)
            finally:
                await backend.aclose()

        # the random tiny model does not stop within 5 tokens: the answer parses, and the server's
        # finish_reason "length" makes it a truncated (malformed) answer, which is never accepted
        with pytest.raises(TransientLLMError, match="cut at max_tokens=5") as e:
            asyncio.run(run())
        assert e.value.kind == "malformed"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
