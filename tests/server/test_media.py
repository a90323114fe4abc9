import base64
import os

import pytest

from server.errors import APIError
from server.media import decode_data_url


@pytest.mark.parametrize("size", [10, 3_000_000])
def test_data_url_decoding_plain_and_line_wrapped(size):
    raw = os.urandom(size)
    enc = base64.b64encode(raw).decode()
    assert decode_data_url("data:image/png;base64," + enc, param="p") == raw
    wrapped = "\n".join(enc[i:i + 76] for i in range(0, len(enc), 76))
    assert decode_data_url("data:image/png;base64," + wrapped, param="p") == raw


def test_non_base64_data_url_is_refused():
    with pytest.raises(APIError) as e:
        decode_data_url("data:image/png,rawbytes", param="p")
    assert e.value.status == 400 and e.value.param == "p"
