"""Images out of a prompt (device-free): `{"prompt", "multi_modal_data": {"image": ...}}` and
chat messages with OpenAI content parts. Image parts become `{"type": "image"}` for the chat
template (which writes the model's `<image>` placeholder); the images are returned in order."""

from __future__ import annotations

from xlaserve.errors import InvalidRequestError
from xlaserve.multimodal.media import MediaPolicy, fetch_image_bytes

IMAGE_PART_TYPES = ("image_url", "image", "input_image")


def split_images(prompt: object, policy: MediaPolicy) -> tuple[object, list]:
    """(the prompt without its images, the images: PIL images or encoded bytes)."""
    if not isinstance(prompt, dict):
        return prompt, []
    if "multi_modal_data" in prompt:
        data = prompt["multi_modal_data"]
        rest = {k: v for k, v in prompt.items() if k != "multi_modal_data"}
        if not isinstance(data, dict) or set(data) - {"image"}:
            raise InvalidRequestError("multi_modal_data", 'multi_modal_data must be '
                                      '{"image": an image or a list of images}')  # fmt: skip
        images = data.get("image", [])
        images = list(images) if isinstance(images, list | tuple) else [images]
        if "messages" not in rest and "prompt" not in rest:
            raise InvalidRequestError("multi_modal_data", "images need a text prompt holding "
                                      "their placeholders (not prompt_token_ids)")  # fmt: skip
        return rest, images
    messages = prompt.get("messages")
    if not isinstance(messages, list | tuple):
        return prompt, []
    images, out = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list | tuple):
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in IMAGE_PART_TYPES:
                parts.append(part)
                continue
            images.append(_part_image(part, policy))
            parts.append({"type": "image"})
        out.append({**message, "content": parts})
    return ({**prompt, "messages": out} if images else prompt), images


def _part_image(part: dict, policy: MediaPolicy):
    if part["type"] == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        return fetch_image_bytes(url, policy)
    if part["type"] == "input_image":
        return fetch_image_bytes(part.get("image_url"), policy)
    image = part.get("image")
    if image is None:
        raise InvalidRequestError("messages", 'an {"type": "image"} part needs "image": a PIL '
                                  "image or encoded bytes")  # fmt: skip
    return image
