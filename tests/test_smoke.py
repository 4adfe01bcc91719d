from openai import OpenAI

from tests.conftest import KEY


def test_non_stream_through_gateway(gateway, mock):
    client = OpenAI(base_url=f"{gateway.url}/api", api_key=KEY)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], extra_body={"customer_identifier": "c1"}
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "The quick brown fox jumps over the lazy dog."
    assert mock.last()["body"]["model"] == "mock-ok"
    assert "customer_identifier" not in mock.last()["body"]
    record = gateway.record(raw.headers["x-respan-log-id"])
    assert record["customer_identifier"] == "c1"
    assert record["prompt_tokens"] == 11
