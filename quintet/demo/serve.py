"""The demo's serving stage: the FP4 model behind `quintet serve`, one request through `openai`."""

from __future__ import annotations


def run_serve_demo(model_dir, question: str = "What does quintet do?") -> str:
    """`make demo`'s last stage: `quintet serve` on `model_dir` as a child process on a free loopback
    port, one chat request through the `openai` client, the answer printed, the server stopped."""
    import time

    import openai

    from quintet.serve.launch import running_server

    start = time.perf_counter()
    with running_server(
        model_dir, "--max-context", "1024", "--threads", "1", "--log-level", "warning"
    ) as url:
        print(f"quintet serve {model_dir} -> {url} (up in {time.perf_counter() - start:.1f} s)")
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        sent = time.perf_counter()
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
        )
        answer = out.choices[0].message.content
        print(f"user: {question}")
        seconds = time.perf_counter() - sent
        print(f"assistant ({out.usage.completion_tokens} tokens, {seconds:.2f} s): {answer!r}")
    print("server stopped")
    return answer
