"""Python client (sync and asyncio) and the `adaptclip` CLI."""
from adaptclip.client.client import AsyncClient, Client, load_lines

__all__ = ["AsyncClient", "Client", "load_lines"]
