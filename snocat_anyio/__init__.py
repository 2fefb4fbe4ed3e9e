"""snocat on asyncio and trio, through anyio."""
