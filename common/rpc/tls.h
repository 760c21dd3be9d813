// TLS for the gRPC services: the coordinator <-> worker channel with client certificates
// (mTLS) and the coordinator's public API. Certificates are PEM files named by the
// --tls-cert / --tls-key / --tls-ca flags of each binary; all empty means plaintext.
#ifndef MOE_COMMON_RPC_TLS_H_
#define MOE_COMMON_RPC_TLS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"

namespace moe {

struct TlsFiles {
  std::string cert;  // this process's certificate chain (PEM)
  std::string key;   // its private key (PEM)
  std::string ca;    // the CA certificates that sign the peers' certificates (PEM)

  bool enabled() const { return !cert.empty() || !key.empty() || !ca.empty(); }
};

// The files' contents, read once.
struct TlsMaterial {
  std::string cert, key, ca;
};

// Reads the files. INVALID_ARGUMENT naming the flag (--tls-cert, --tls-key, --tls-ca) when one
// that `need_ca` / a server needs is missing, or a file cannot be read or holds no PEM block.
absl::StatusOr<TlsMaterial> LoadTls(const TlsFiles& files, bool need_ca);

// Server side: plaintext when `files` is empty. With require_client_cert, a client must show a
// certificate signed by files.ca (mTLS; the worker); else any client may connect (the public
// API, where tokens authenticate).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const TlsFiles& files, bool require_client_cert);

// Client side: plaintext when `files` is empty; else the server must show a certificate signed
// by files.ca for the host it is dialled by, and cert/key (when given) are presented to it.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(const TlsFiles& files);

}  // namespace moe

#endif  // MOE_COMMON_RPC_TLS_H_
