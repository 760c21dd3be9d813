#include "common/rpc/tls.h"

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/security/server_credentials.h"

namespace moe {

namespace {

// A PEM file's contents; INVALID_ARGUMENT naming the flag when it cannot be read or holds no
// PEM block (a DER file, a path to a directory, an empty file).
absl::StatusOr<std::string> ReadPem(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--", flag, " ", path, ": cannot read"));
  std::ostringstream s;
  s << in.rdbuf();
  std::string pem = s.str();
  if (pem.size() > (size_t{1} << 20) || !absl::StrContains(pem, "-----BEGIN ")) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " ", path, ": not a PEM file (expected -----BEGIN ...)"));
  }
  return pem;
}

}  // namespace

absl::StatusOr<TlsMaterial> LoadTls(const TlsFiles& files, bool need_ca) {
  if (files.cert.empty() != files.key.empty()) {
    return absl::InvalidArgumentError(
        "--tls-cert and --tls-key go together: give both (the certificate and its private key)");
  }
  if (need_ca && files.ca.empty()) {
    return absl::InvalidArgumentError(
        "--tls-ca is required with TLS here: the CA file that signs the peers' certificates");
  }
  TlsMaterial m;
  if (!files.cert.empty()) {
    auto cert = ReadPem(files.cert, "tls-cert");
    if (!cert.ok()) return cert.status();
    auto key = ReadPem(files.key, "tls-key");
    if (!key.ok()) return key.status();
    m.cert = std::move(*cert);
    m.key = std::move(*key);
  }
  if (!files.ca.empty()) {
    auto ca = ReadPem(files.ca, "tls-ca");
    if (!ca.ok()) return ca.status();
    m.ca = std::move(*ca);
  }
  return m;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const TlsFiles& files, bool require_client_cert) {
  if (!files.enabled()) return grpc::InsecureServerCredentials();
  if (files.cert.empty()) {
    return absl::InvalidArgumentError(
        "serving TLS needs --tls-cert and --tls-key (this server's certificate and key)");
  }
  auto m = LoadTls(files, /*need_ca=*/require_client_cert);
  if (!m.ok()) return m.status();
  grpc::SslServerCredentialsOptions options(
      require_client_cert ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                          : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  options.pem_root_certs = m->ca;
  options.pem_key_cert_pairs.push_back({m->key, m->cert});
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(
    const TlsFiles& files) {
  if (!files.enabled()) return grpc::InsecureChannelCredentials();
  auto m = LoadTls(files, /*need_ca=*/true);
  if (!m.ok()) return m.status();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = m->ca;
  options.pem_private_key = m->key;
  options.pem_cert_chain = m->cert;
  return grpc::SslCredentials(options);
}

}  // namespace moe
