"""A typed Python client of atelier's HTTP API (httpx, async).

    async with AtelierClient("http://127.0.0.1:8000", api_key) as atelier:
        subject = await atelier.create_subject(photos)
        look = await atelier.create_look(subject.id, "a Harry Potter costume")
        async for event in atelier.look_events(look.id):
            print(event.name, event.data)

Responses are parsed into the API's own response models (``api.schemas``,
``api.look_schemas``...): one contract, no copy to drift. POSTs that create
something carry an Idempotency-Key, so the client retries them safely.
"""

from client.atelier import AtelierClient, LookEvent
from client.errors import AtelierAPIError

__all__ = ["AtelierAPIError", "AtelierClient", "LookEvent"]
