"""HTTP exchanges -> LLM exchange records.

    assembler.py      ExchangeAssembler: one per connection, HTTP events in, LlmExchange records out
    record.py         LlmExchange, the pydantic record every sink writes
    providers/        detection (host, path, body) and one module per wire-format family
    sse.py, ndjson.py, eventstream.py   incremental stream framings (SSE, NDJSON / JSON array, AWS event stream)
    conversations.py  tool-use ids -> conversation_id, bounded LRU

Pure: no I/O, no clock, no threads (the conversation tracker has a lock because one instance serves
every connection).
"""
