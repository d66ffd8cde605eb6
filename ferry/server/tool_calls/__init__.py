"""Tool calling: the constraint that ``tool_choice`` required / named asks for
(``constraint.py``), parsers of each model family's tool-call syntax (``parsers.py``),
and turning a finished generation into OpenAI ``tool_calls`` (``extract.py``)."""
