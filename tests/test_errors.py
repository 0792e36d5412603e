"""The exception families: broken means dead, refused means the stream is fine."""

from __future__ import annotations

import pytest
import trio

import trio_ktls

from .helpers import ktls_pair_maker, receive_exactly

BROKEN = [
    trio_ktls.TLSProtocolError,
    trio_ktls.KTLSRekeyFailedError,
    trio_ktls.ConfidentialityLimitError,
]
NOT_BROKEN = [trio_ktls.KTLSUnavailableError, trio_ktls.KeyUpdateUnavailableError]


@pytest.mark.parametrize("cls", [*BROKEN, *NOT_BROKEN, trio_ktls.TLSDecodeError])
def test_public_module_name(cls: type[Exception]) -> None:
    assert cls.__module__ == "trio_ktls"
    assert getattr(trio_ktls, cls.__name__) is cls


@pytest.mark.parametrize("cls", BROKEN)
def test_a_dead_stream_is_a_broken_resource(cls: type[Exception]) -> None:
    assert issubclass(cls, trio.BrokenResourceError)


@pytest.mark.parametrize("cls", NOT_BROKEN)
def test_a_refusal_is_not_a_broken_resource(cls: type[Exception]) -> None:
    assert not issubclass(cls, trio.BrokenResourceError)


async def test_update_keys_in_user_space_is_refused_and_the_stream_works() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, "TLSv1.3", "off")()
        with pytest.raises(trio_ktls.KeyUpdateUnavailableError, match="user space"):
            await client.update_keys()
        await client.send_all(b"still fine")
        assert await receive_exactly(server, 10) == b"still fine"
        await client.aclose()
        await server.aclose()
