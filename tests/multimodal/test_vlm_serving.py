"""Images over the OpenAI chat API (the official openai client, base64 data URLs) on a tiny
SmolVLM: the same tokens as the offline chat; bad images, refused URLs and too many images
are HTTP 400 naming the problem, and the server keeps serving."""

import base64
import io

import pytest
from conftest import image

from xlaserve import SamplingParams
from xlaserve.engine.async_engine import AsyncEngine
from xlaserve.engine.intake import RequestIntake
from xlaserve.errors import InvalidRequestError
from xlaserve.serving.server import ServerConfig, ServerThread

QUESTION = "What is shown?"


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def messages(*urls):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]


OFFLINE_IMAGE = image(50, 70, 31)


@pytest.fixture(scope="module")
def served(tiny_llm):
    import openai

    engine = tiny_llm.engine
    # The offline answer first (the server's thread owns the engine once it starts).
    offline = [{"role": "user", "content": [{"type": "image", "image": OFFLINE_IMAGE},
                                            {"type": "text", "text": QUESTION}]}]  # fmt: skip
    expected = tiny_llm.chat(offline, SamplingParams(max_tokens=8, temperature=0),
                             use_tqdm=False)[0]  # fmt: skip
    server = ServerThread(AsyncEngine(engine), ServerConfig(grpc_port=0, http_port=0))
    server.start()
    client = openai.OpenAI(base_url=server.endpoints.http_url + "/v1", api_key="-",
                           max_retries=0)  # fmt: skip
    tiny_llm.grpc_target = server.endpoints.grpc_target
    yield client, engine, tiny_llm.media_folder, expected
    assert server.stop() == 0


def test_data_url_image_gives_the_offline_chat_tokens(served):
    client, engine, _, expected = served
    response = client.chat.completions.create(
        model=str(engine.model_name), messages=messages(data_url(OFFLINE_IMAGE)), max_tokens=8,
        temperature=0, extra_body={"return_tokens_as_token_ids": True}, logprobs=True,
    )  # fmt: skip
    served_ids = [int(t.token.split(":")[1]) for t in response.choices[0].logprobs.content]
    # PNG is lossless: the server decodes the offline image's pixels, so the same tokens.
    assert served_ids == list(expected.outputs[0].token_ids)
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)


@pytest.mark.parametrize(
    "urls, match",
    [
        (["data:image/png;base64,!!!notbase64"], "not valid base64"),
        (["data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nxx").decode()],
         "image 0 cannot be decoded"),
        (["data:text/plain;base64,aGVsbG8="], "not an image type"),
        (["http://example.com/cat.png"], "remote image URLs are refused"),
        (["file:///etc/hostname"], "outside the allowed folder"),
        ([data_url(image(9, 9, i)) for i in range(3)], "3 images in one prompt"),
        (["data:image/bmp;base64," + base64.b64encode(b"BM" + b"\0" * 40).decode()],
         "image 0 cannot be decoded"),
    ],
)  # fmt: skip
def test_bad_images_are_http_400_and_the_server_keeps_serving(served, urls, match):
    import openai

    client, engine, _, _ = served
    with pytest.raises(openai.BadRequestError, match=match) as e:
        client.chat.completions.create(model=str(engine.model_name), messages=messages(*urls),
                                       max_tokens=4)  # fmt: skip
    assert e.value.status_code == 400
    ok = client.chat.completions.create(model=str(engine.model_name), max_tokens=2,
                                        messages=messages(data_url(image(20, 20, 1))))  # fmt: skip
    assert ok.usage.completion_tokens == 2


def test_local_files_only_under_the_allowed_folder(served):
    client, engine, allowed, _ = served
    path = allowed / "pic.png"
    image(40, 40, 5).save(path)
    ok = client.chat.completions.create(model=str(engine.model_name), max_tokens=2,
                                        messages=messages(path.as_uri()))  # fmt: skip
    assert ok.usage.prompt_tokens > 20  # the image's placeholders are in the prompt


def test_an_image_for_a_text_only_model_is_refused(vlm_tokenizer):
    intake = RequestIntake(vlm_tokenizer, vocab_size=len(vlm_tokenizer), max_model_len=64)
    with pytest.raises(InvalidRequestError, match="takes no images") as e:
        intake.process("r", {"prompt": "<image>", "multi_modal_data": {"image": image(8, 8, 0)}},
                       None, arrival_time=0.0)  # fmt: skip
    assert e.value.param == "multi_modal_data"
    with pytest.raises(InvalidRequestError, match="takes no images"):
        intake.process("r", {"messages": messages(data_url(image(8, 8, 0)))}, None,
                       arrival_time=0.0)  # fmt: skip


def test_grpc_image_bytes(served, tiny_llm):
    import grpc

    from xlaserve.serving.client import XlaServeClient

    target = tiny_llm.grpc_target
    png = base64.b64decode(data_url(OFFLINE_IMAGE).split(",", 1)[1])
    text = "Look: <image> now"
    with XlaServeClient(target, timeout=60) as client:
        result = client.generate(text, images=[png], max_tokens=4, temperature=0)
        assert result.finished and len(result.samples[0].token_ids) == 4
        for images, match in (([png, png], "1 <image> placeholder"),
                              ([b"not an image"], "image 0 cannot be decoded")):  # fmt: skip
            with pytest.raises(grpc.RpcError, match=match) as e:
                client.generate(text, images=images, max_tokens=4)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        again = client.generate(text, images=[png], max_tokens=4, temperature=0)
        assert again.samples[0].token_ids == result.samples[0].token_ids


def test_torch_parity_backend_refuses_vision_language_models(smolvlm_folder):
    from xlaserve import LLM

    with pytest.raises(ValueError, match="backend 'torch' does not run vision-language models"):
        LLM(str(smolvlm_folder[0]), backend="torch")
