"""Stop conditions applied after each token a step appends to a request. Pure Python."""
from __future__ import annotations

from ferry.request import Request, RequestStatus


def stop_status(request: Request, token_id: int, max_len: int) -> RequestStatus | None:
    """The finished status ``token_id`` (just appended) gives the request, or None."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        # vLLM's contract, which clients read: a stop_token_ids id is the stop reason,
        # an EOS is not (stop_reason stays None).
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if not params.ignore_eos and token_id in request.eos_token_ids:
            request.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
    if ((params.max_tokens is not None and request.num_output_tokens >= params.max_tokens)
            or request.num_tokens >= max_len):
        return RequestStatus.FINISHED_LENGTH
    return None


def append_tokens(request: Request, token_ids: list[int], max_len: int
                  ) -> tuple[list[int], RequestStatus | None]:
    """Append tokens until one ends the request; returns those appended and the status."""
    for count, token_id in enumerate(token_ids, start=1):
        request.append_output_token(token_id)
        status = stop_status(request, token_id, max_len)
        if status is not None:
            return token_ids[:count], status
    return token_ids, None
