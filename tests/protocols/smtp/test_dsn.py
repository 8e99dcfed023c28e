"""RFC 3461 DSN parameters: taken out of MAIL/RCPT arguments, case kept."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.smtp.dsn import (
    DsnParamError,
    MailParams,
    RcptParams,
    decode_xtext,
    encode_xtext,
    take_mail_params,
    take_rcpt_params,
)


def test_mail_params_are_taken_out_and_the_rest_goes_on() -> None:
    rest, params = take_mail_params("FROM:<a@b.test> SIZE=100 ret=full ENVID=Q+2Bx BODY=8BITMIME")
    assert rest == "FROM:<a@b.test> SIZE=100 BODY=8BITMIME"
    assert params == MailParams("FULL", "Q+x")
    assert take_mail_params("FROM:<a@b.test>") == ("FROM:<a@b.test>", MailParams())


def test_rcpt_params_keep_the_client_case_of_orcpt() -> None:
    rest, params = take_rcpt_params("TO:<x@y.test> NOTIFY=delay,Success ORCPT=RFC822;Mixed+2BCase@Y.Test")
    assert rest == "TO:<x@y.test>"
    assert params == RcptParams("SUCCESS,DELAY", "rfc822;Mixed+Case@Y.Test")
    assert take_rcpt_params("TO:<x@y.test> NOTIFY=NEVER")[1].notify == "NEVER"


def test_a_quoted_local_part_may_hold_a_closing_bracket() -> None:
    rest, params = take_rcpt_params('TO:<"odd>name"@y.test> NOTIFY=FAILURE')
    assert rest == 'TO:<"odd>name"@y.test>' and params.notify == "FAILURE"


@pytest.mark.parametrize("arg", [
    "TO:<x@y.test> NOTIFY=",
    "TO:<x@y.test> NOTIFY=NEVER,FAILURE",
    "TO:<x@y.test> NOTIFY=FAILURE,FAILURE",
    "TO:<x@y.test> NOTIFY=SOON",
    "TO:<x@y.test> ORCPT=rfc822",
    "TO:<x@y.test> ORCPT=;x@y",
    "TO:<x@y.test> ORCPT=rfc822;a+ZZ",
    "TO:<x@y.test> ORCPT=rfc822;",
    "TO:<x@y.test> NOTIFY=FAILURE NOTIFY=DELAY",
    "TO:<x@y.test> NOTIFY",
])
def test_bad_rcpt_params_are_refused(arg: str) -> None:
    with pytest.raises(DsnParamError) as err:
        take_rcpt_params(arg)
    assert str(err.value).startswith("501 5.5.4")


@pytest.mark.parametrize("arg", ["FROM:<a@b> RET=SOME", "FROM:<a@b> ENVID=" + "x" * 101, "FROM:<a@b> ENVID=a=b",
                                 "FROM:<a@b> ENVID=caf\u00e9", "FROM:<a@b> RET=FULL RET=HDRS"])
def test_bad_mail_params_are_refused(arg: str) -> None:
    with pytest.raises(DsnParamError):
        take_mail_params(arg)


@given(st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=60))
def test_xtext_round_trips(text: str) -> None:
    encoded = encode_xtext(text)
    assert encoded.isascii() and " " not in encoded and "=" not in encoded
    assert decode_xtext(encoded) == text


@given(st.text(max_size=80))
def test_any_argument_gives_params_or_a_501(arg: str) -> None:
    for take in (take_mail_params, take_rcpt_params):
        try:
            rest, _ = take("TO:<x@y.test> " + arg)
        except DsnParamError as exc:
            assert str(exc).startswith("501 ")
        else:
            assert rest.startswith("TO:<x@y.test>")
