"""Publish/subscribe with asyncio: ``async for`` over a channel, without blocking the loop."""
import asyncio
import os
import tempfile

from beaver import BeaverDB


async def consume(channel, count):
    async with channel.subscribe() as sub:
        async for message in sub.listen(timeout=10):
            print(f"  received {message}")
            count -= 1
            if count == 0:
                return


async def main(path):
    with BeaverDB(path) as db:
        chat = db.channel("chat").as_async()
        consumer = asyncio.create_task(consume(chat, 3))
        await asyncio.sleep(0)                   # let the consumer subscribe first
        for text in ("hello", "how are you?", "bye"):
            await chat.publish({"text": text})
            await asyncio.sleep(0.05)
        await consumer
        print("consumer done;", await chat.len(), "messages kept")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(main(os.path.join(folder, "async_pubsub.db")))
