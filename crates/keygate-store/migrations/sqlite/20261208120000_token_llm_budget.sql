-- A token's own LLM budget (issue 16): what it may spend on LLM calls per day or month over every
-- ai route, as JSON {"micro_usd": N, "period": "day" | "month"}; NULL: none.
ALTER TABLE tokens ADD COLUMN llm_budget TEXT;
