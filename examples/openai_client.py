"""Talk to a DSpark-enabled vLLM server (see README "Serving with vLLM") with the OpenAI client.

    .venv/bin/python examples/openai_client.py http://127.0.0.1:8000/v1 MODEL_NAME
"""

import sys

from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1"
client = OpenAI(base_url=base_url, api_key="none")
model = sys.argv[2] if len(sys.argv) > 2 else client.models.list().data[0].id
reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 12 times 7?"}],
                                       temperature=0, max_tokens=48)
print(reply.choices[0].message.content)
for chunk in client.chat.completions.create(model=model, stream=True, temperature=0, max_tokens=48,
                                            messages=[{"role": "user", "content": "Write a haiku about the sea."}]):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
