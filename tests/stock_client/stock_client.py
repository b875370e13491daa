"""Corsair's API as a stock gRPC client sees it: Python grpcio, with the message types
found through server reflection (no .proto files, no generated code), and the rich error
details read with grpcio-status.

Usage: stock_client.py ADDRESS TOKEN. Exits 0 when every expectation holds; otherwise
prints the first that does not and exits 1.
"""

import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status


class Bearer(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Presents the token on every call, reflection's included."""

    def __init__(self, token):
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _with_token(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


def main(address, token):
    channel = grpc.intercept_channel(grpc.insecure_channel(address), Bearer(token))
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName("corsair.v1.PolicyService")

    def method(service_name, name):
        found = pool.FindServiceByName(service_name).FindMethodByName(name)
        request = message_factory.GetMessageClass(found.input_type)
        response = message_factory.GetMessageClass(found.output_type)
        call = channel.unary_unary(
            f"/{service_name}/{name}",
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )
        return lambda **fields: call(request(**fields), timeout=10)

    def policy_method(name):
        return method(service.full_name, name)

    def refused(call, code, reason):
        try:
            call()
        except grpc.RpcError as error:
            expect(error.code() == code, f"{code} expected, got {error.code()}")
            status = rpc_status.from_call(error)
            expect(status is not None, "rich error details")
            info = error_details_pb2.ErrorInfo()
            resource = None
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    detail.Unpack(info)
                if detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
                    resource = error_details_pb2.ResourceInfo()
                    detail.Unpack(resource)
            expect(info.reason == reason, f"reason {reason} expected, got {info.reason!r}")
            expect(info.domain == "corsair.dev", f"domain {info.domain!r}")
            return info, resource
        raise Failed(f"{code} expected, the call succeeded")

    policy_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("corsair.v1.Policy"))
    create = policy_method("CreatePolicy")
    created = create(policy=policy_class(service="stock", allowed_origins=["https://a.example.com"]))
    expect(created.name == "services/stock/policy", f"name {created.name!r}")
    expect(created.revision > 0 and created.etag.startswith('"'), "revision and quoted etag")

    got = policy_method("GetPolicy")(name="services/stock/policy")
    expect(got == created, "GetPolicy returns what CreatePolicy did")

    updated = policy_method("UpdatePolicy")(
        policy=policy_class(
            name=created.name,
            etag=created.etag.strip('"'),
            allowed_origins=["https://a.example.com", "https://b.example.com"],
        )
    )
    expect(updated.revision > created.revision, "an unquoted etag is accepted")
    info, _ = refused(
        lambda: policy_method("UpdatePolicy")(policy=policy_class(name=created.name, etag=created.etag)),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    expect(info.metadata["current_etag"] == updated.etag, "ABORTED carries the current etag")

    _, resource = refused(
        lambda: policy_method("GetPolicy")(name="services/nobody/policy"),
        grpc.StatusCode.NOT_FOUND,
        "POLICY_NOT_FOUND",
    )
    expect(resource is not None and resource.resource_name == "services/nobody/policy", "ResourceInfo")
    refused(lambda: policy_method("GetPolicy")(name="nobody"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME")

    create(policy=policy_class(service="stock-2", allowed_origins=["https://a.example.com"]))
    page = policy_method("ListPolicies")(page_size=1)
    expect(len(page.policies) == 1 and page.next_page_token, "a first page and a token")
    refused(
        lambda: policy_method("ListPolicies")(page_size=1, page_token=page.next_page_token[:-2] + "AA"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    refused(
        lambda: policy_method("ListPolicies")(page_size=1, page_token=page.next_page_token, service_prefix="x"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )

    event = method("corsair.v1.AuditService", "GetAuditEvent")(name="auditEvents/1")
    expect(event.name == "auditEvents/1", f"audit event name {event.name!r}")
    refused(
        lambda: method("corsair.v1.AuditService", "ListAuditEvents")(method="NoSuchMethod"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_METHOD",
    )
    print("ok: names, writes returning the resource, etags, page tokens and rich errors")


class Failed(Exception):
    pass


def expect(condition, what):
    if not condition:
        raise Failed(what)


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2])
    except Failed as failure:
        print(f"stock client: {failure}", file=sys.stderr)
        sys.exit(1)
