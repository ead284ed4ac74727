"""The memory layer as a service: an HTTP API (``http_api``) and an MCP server (``mcp_server``)
over the async contract, with API keys bound to users (``keys``). Nothing here knows SQL or a
driver's internals."""
